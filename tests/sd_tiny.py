"""Tiny random-weight Stable Diffusion models (SD1, SD2-v, SDXL, SD1 inpainting) with the real
architectures' classes, scaled down, saved as diffusers folders. No weights are downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from velodiff.models.configs import bytes_to_unicode

WORDS = [
    "a",
    "photo",
    "of",
    "red",
    "blue",
    "cube",
    "sphere",
    "cat",
    "dog",
    "on",
    "the",
    "table",
    "in",
    "garden",
    "blurry",
    "ugly",
    "painting",
    "green",
]


def clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over the byte alphabet plus whole-word merges for WORDS."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        toks = list(word[:-1]) + [word[-1] + "</w>"]
        while len(toks) > 1:
            merged = toks[0] + toks[1]
            m = f"{toks[0]} {toks[1]}"
            if m not in merges:
                merges.append(m)
                if merged not in vocab_list:
                    vocab_list.append(merged)
            toks = [merged] + toks[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=max_length
    )


def text_encoder(tok, hidden: int = 32, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def save_clip(folder, seed: int = 0):
    """A tiny CLIP (text and vision towers, 32 px images) with the tokenizer, saved as a transformers folder
    (what ``--clip PATH`` / ``ClipScore`` read); returns the folder."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = clip_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def vae(seed: int = 0, force_upcast: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=16,
        layers_per_block=1,
        norm_num_groups=32,
        force_upcast=force_upcast,
    ).eval()


def _scale_weights(module: torch.nn.Module, seed: int) -> None:
    """Random weights make a random UNet's output near zero; give it O(1) outputs so parity is meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def unet(kind: str = "sd1", in_channels: int = 4, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        norm_num_groups=32,
    )
    if kind == "sd1":
        m = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
    elif kind == "sd2":
        m = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    elif kind == "sdxl":
        m = UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=32 + 48,
        )
    else:
        raise ValueError(kind)
    _scale_weights(m, seed + 1)
    return m.eval()


SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


def save_sd(
    path: Path, kind: str = "sd1", *, inpainting: bool = False, prediction_type: str = "epsilon"
) -> Path:
    """Save a tiny pipeline of ``kind`` (sd1, sd2, sdxl) to ``path`` and return it."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    sched = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    u = unet(kind, in_channels=9 if inpainting else 4)
    if kind == "sdxl":
        tok = clip_tokenizer()
        pipe = StableDiffusionXLPipeline(
            vae=vae(force_upcast=True),
            text_encoder=text_encoder(tok, seed=1),
            tokenizer=tok,
            text_encoder_2=text_encoder(tok, hidden=48, projection=32, seed=2),
            tokenizer_2=clip_tokenizer(),
            unet=u,
            scheduler=sched,
        )
    else:
        tok = clip_tokenizer()
        cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        pipe = cls(
            vae=vae(),
            text_encoder=text_encoder(tok, seed=1),
            tokenizer=tok,
            unet=u,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(str(path))
    return path


class Loaded(dict):
    """Tiny models saved as diffusers folders under ``root`` and loaded through velodiff, made on first
    use: ``models["sd1"]`` (a module fixture's cache; ``folder(name)`` the saved folder)."""

    KINDS = {
        "sd1": dict(kind="sd1"),
        "sd2": dict(kind="sd2", prediction_type="v_prediction"),
        "sdxl": dict(kind="sdxl"),
        "sd1-inpaint": dict(kind="sd1", inpainting=True),
    }

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root, self.folders = root, {}

    def folder(self, name: str) -> Path:
        if name not in self.folders:
            self.folders[name] = save_sd(self.root / name, **self.KINDS[name])
        return self.folders[name]

    def __missing__(self, name: str):
        from velodiff.models import load

        self[name] = load(self.folder(name))
        return self[name]
