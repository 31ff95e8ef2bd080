"""Write a diffusers Stable Diffusion 1.x pipeline as one original-layout (CompVis LDM) checkpoint,
so tests can exercise single-file loading with tiny weights. Names follow the LDM modules:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*``
(CLIP text encoder); diffusers' from_single_file reads them back."""

from __future__ import annotations

from pathlib import Path

import torch

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _sub(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}" if tail else table.get(head, head)


def unet_to_ldm(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for k, v in state.items():
        p = k.split(".")
        new = None
        for a, b in fixed.items():
            if k.startswith(a + "."):
                new = b + k[len(a) :]
        if p[0] == "down_blocks":
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (per + 1)}.0.op.{'.'.join(p[5:])}"
            else:
                idx = 1 + i * (per + 1) + j
                new = (
                    f"input_blocks.{idx}.0.{_sub(rest, RESNET)}"
                    if kind == "resnets"
                    else f"input_blocks.{idx}.1.{rest}"
                )
        elif p[0] == "up_blocks":
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "upsamplers":
                new = f"output_blocks.{i * (per + 1) + per}.{2 if up_attn[i] else 1}.conv.{'.'.join(p[5:])}"
            else:
                idx = i * (per + 1) + j
                new = (
                    f"output_blocks.{idx}.0.{_sub(rest, RESNET)}"
                    if kind == "resnets"
                    else f"output_blocks.{idx}.1.{rest}"
                )
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
            new = (
                f"middle_block.{2 * j}.{_sub(rest, RESNET)}"
                if kind == "resnets"
                else f"middle_block.1.{rest}"
            )
        if new is None:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    assert n >= 1
    return out


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    n = len(cfg.block_out_channels)
    out = {}
    for k, v in state.items():
        p = k.split(".")
        new = k
        if p[0] in ("encoder", "decoder"):
            part = p[0]
            if p[1] == "conv_norm_out":
                new = f"{part}.norm_out.{p[2]}"
            elif p[1] in ("down_blocks", "up_blocks"):
                i = int(p[2]) if p[1] == "down_blocks" else n - 1 - int(p[2])
                level = "down" if p[1] == "down_blocks" else "up"
                if p[3] == "resnets":
                    new = f"{part}.{level}.{i}.block.{p[4]}.{_sub('.'.join(p[5:]), VAE_RESNET)}"
                else:
                    new = f"{part}.{level}.{i}.{'downsample' if level == 'down' else 'upsample'}.conv.{p[-1]}"
            elif p[1] == "mid_block":
                if p[2] == "resnets":
                    new = f"{part}.mid.block_{int(p[3]) + 1}.{_sub('.'.join(p[4:]), VAE_RESNET)}"
                else:
                    name = VAE_ATTN[p[4]]
                    new = f"{part}.mid.attn_1.{name}.{p[-1]}"
                    if v.ndim == 2:
                        v = v[:, :, None, None]
        out["first_stage_model." + new] = v
    return out


def save_sd1_single_file(folder: Path, out: Path) -> Path:
    """The tiny SD1 pipeline in ``folder`` as one .safetensors file in the original layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    sd = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    sd.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in te.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out


OPENCLIP = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def openclip_text_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (fused q/k/v, transposed projection)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
        prefix + "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
        for k in [k for k in state if k.startswith(src)]:
            rest = k[len(src) :]
            for a, b in OPENCLIP.items():
                rest = rest.replace(a, b)
            out[dst + rest] = state.pop(k)
    leftover = [k for k in state if "position_ids" not in k]
    assert not leftover, leftover
    return out


def save_sdxl_single_file(folder: Path, out: Path) -> Path:
    """The tiny SDXL pipeline in ``folder`` as one .safetensors file in the original (SGM) layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te1 = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
    sd = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    sd.update(
        {
            f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in te1.state_dict().items()
        }
    )
    sd.update(openclip_text_to_ldm(te2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out


def save_sd15_full_size(out: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A full-size Stable Diffusion 1.5 single file (860M-parameter UNet, KL VAE, CLIP ViT-L/14 text
    tower; 4.3 GB in float32) with random weights, in the original (LDM) layout: the published
    architectures (velodiff's bundled configs) are built on the meta device for their tensor names
    and shapes only, then every tensor is drawn directly, so no 4 GB model is ever initialized.

    Weights: normal(0, 0.02), biases 0, norm scales 1, so activations stay finite through the network
    (the image is noise, its size and the loading path are what a test checks)."""
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from velodiff.models.configs import published_folder

    folder = published_folder("sd15")

    def config(sub: str) -> dict:
        return json.loads((folder / sub / "config.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    g = torch.Generator().manual_seed(seed)

    def draw(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, meta in state.items():
            if k.endswith("position_ids"):
                out[k] = torch.arange(meta.shape[-1])[None]
            elif k.endswith("bias"):
                out[k] = torch.zeros(meta.shape, dtype=dtype)
            elif meta.ndim == 1:  # norm scales
                out[k] = torch.ones(meta.shape, dtype=dtype)
            else:
                out[k] = (torch.randn(meta.shape, generator=g) * 0.02).to(dtype)
        return out

    sd = {
        **unet_to_ldm(draw(unet.state_dict()), unet.config),
        **vae_to_ldm(draw(vae.state_dict()), vae.config),
    }
    sd.update(
        {
            f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in draw(te.state_dict()).items()
        }
    )
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out
