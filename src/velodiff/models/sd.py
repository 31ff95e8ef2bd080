"""Stable Diffusion 1.x and 2.x: a diffusers UNet2DConditionModel, AutoencoderKL and CLIP text encoder.

SD1 and SD2 differ in the text encoder (CLIP ViT-L/14, 768 wide, vs OpenCLIP ViT-H/14, 1024 wide),
the UNet's attention layout (SD2: linear projections, per-level head dims) and, for the 768-pixel
SD2 checkpoints, the prediction type (v). The prompt is encoded as diffusers' StableDiffusionPipeline
does: padded to 77 tokens, last hidden state (``clip_skip`` = k uses the k-th layer from the end
followed by the final layer norm), the negative prompt "" when none is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..denoisers import Cond
from ..errors import VelodiffError, first_line, shorten
from ..schedules import DiscreteVP
from .base import LoadedModel, NetworkDenoiser, UNetNetwork, as_guided, guidance_embedding, register_family
from .loading import Source
from .weights import from_pretrained, from_single_file

SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInpaintPipelineLegacy",
    "AltDiffusionPipeline",
    "LatentConsistencyModelPipeline",  # an LCM-distilled SD 1.x UNet (time_cond_proj_dim)
    "LatentConsistencyModelImg2ImgPipeline",
}

# tensor names in original (CompVis / Stability) single-file checkpoints
LDM_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_KEY = "cond_stage_model.transformer."
SD2_TEXT_KEY = "cond_stage_model.model.transformer.resblocks."


def load_clip_tokenizer(path: Path, subfolder: str = "tokenizer") -> Any:
    from transformers import CLIPTokenizer

    if not (Path(path) / subfolder).is_dir():  # transformers would build an empty tokenizer instead
        raise VelodiffError(f"cannot load {subfolder}/ from {path}: the folder is missing")
    return from_pretrained(CLIPTokenizer, path, subfolder, weights=False)


@dataclass
class SDModel(LoadedModel):
    """Stable Diffusion 1.x / 2.x. ``components``: unet, vae, text_encoder, tokenizer, scheduler_config."""

    clip_skip: int = 0
    #: whether the text encoders are CLIP's, whose layers ``clip_skip`` counts (T5 alone: PixArt, Flux's
    #: prompt encoder is CLIP-pooled only)
    uses_clip_skip: ClassVar[bool] = True

    @property
    def unet(self) -> Any:
        return self.components["unet"]

    @property
    def vae(self) -> Any:
        return self.components["vae"]

    # -- text --

    def tokenize(self, tokenizer: Any, texts: Sequence[str]) -> Tensor:
        """Token ids padded / truncated to the tokenizer's length; warns with the words dropped."""
        n = int(min(tokenizer.model_max_length, 10_000))
        ids = tokenizer(
            list(texts), padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        ).input_ids
        full = tokenizer(list(texts), truncation=False, verbose=False).input_ids  # our warning, not its log
        for text, row in zip(texts, full, strict=True):  # named by its text: a negative is no "prompt 1"
            if len(row) > n:
                dropped = tokenizer.decode(row[n - 1 : -1]).strip()
                warnings.warn(
                    f"the text {shorten(text, 40)} has {len(row)} tokens; the text encoder reads {n}, "
                    f"so these words were dropped: {shorten(dropped)}",
                    UserWarning,
                    stacklevel=4,
                )
        return ids

    def _text_hidden(
        self,
        encoder: Any,
        ids: Tensor,
        *,
        layer_from_end: int = 0,
        pooled: bool = False,
        final_norm: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):  # the tokenizer's attention_mask:
            pad, eos = (getattr(encoder.config, k, -1) for k in ("pad_token_id", "eos_token_id"))
            padding = ids == pad
            if pad == eos:  # CLIP pads with its end token: the first one ends the prompt and is attended
                padding = padding & (padding.cumsum(dim=1) > 1)
            mask = (~padding).long().to(self.device)
        want_hidden = layer_from_end > 0
        out = encoder(ids.to(self.device), attention_mask=mask, output_hidden_states=want_hidden)
        if want_hidden:
            h = out.hidden_states[-(layer_from_end + 1)]
            if final_norm:
                h = getattr(encoder, "text_model", encoder).final_layer_norm(h)
        else:
            h = out[0]
        return h, (out[0] if pooled else None)

    def encode_prompt(
        self,
        prompts: list[str],
        negative: list[str] | None = None,
        *,
        guided: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> Cond:
        """{"encoder_hidden_states": (B, 77, D)} for the prompts, and for the negatives ("" by default)
        as a GuidedCond when ``guided``; prompt and negative run as one text-encoder batch."""
        prompts = list(prompts)
        negs = _negatives(prompts, negative) if guided else []
        te = self.components["text_encoder"]
        ids = self.tokenize(self.components["tokenizer"], prompts + negs)
        with torch.inference_mode():
            h, _ = self._text_hidden(te, ids, layer_from_end=self.clip_skip)
        h = h.to(self.dtype)
        cond = {"encoder_hidden_states": h[: len(prompts)], **self._embedded_guidance(len(prompts))}
        uncond = {"encoder_hidden_states": h[len(prompts) :], **self._embedded_guidance(len(negs))}
        return as_guided(cond, uncond if guided else None)

    def _embedded_guidance(self, n: int) -> dict[str, Tensor]:
        """``timestep_cond`` for a guidance-distilled UNet (``time_cond_proj_dim``): the embedded scale
        (``embedded_guidance``, 1 when unset) for ``n`` rows; {} for other UNets."""
        dim = self.unet.config.get("time_cond_proj_dim")
        if not dim or n == 0:
            return {}
        w = 1.0 if self.embedded_guidance is None else float(self.embedded_guidance)
        emb = guidance_embedding(torch.full((n,), w - 1.0), int(dim))
        return {"timestep_cond": emb.to(self.device, self.dtype)}

    # -- images --

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def decode(self, latents: Tensor, grad: bool = False) -> Tensor:
        """Latents -> images (B, 3, H, W) float32 in [0, 1]; ``grad``: differentiable in the latents
        (classifier guidance through x0)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            img = self.vae.decode(z.to(self._vae_dtype()), return_dict=False)[0]
            return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (float32): the mean of the VAE posterior (deterministic;
        diffusers samples it with the generator, a difference of about the posterior's std, ~1e-3)."""
        cfg = self.vae.config
        x = images.to(self.device, self._vae_dtype()) * 2 - 1
        with torch.inference_mode():
            z = self.vae.encode(x, return_dict=False)[0].mode().float()
        if getattr(cfg, "shift_factor", None):
            z = z - cfg.shift_factor
        return z * cfg.scaling_factor

    # -- interop --

    def to_diffusers(self, scheduler: Any = None) -> Any:
        """The same modules as a diffusers StableDiffusion pipeline (shared weights), for comparisons.
        ``scheduler``: a diffusers scheduler instance (default: DDIM from the model's scheduler config)."""
        from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

        c = self.components
        sched = scheduler or DDIMScheduler.from_config(c["scheduler_config"])
        cls = StableDiffusionInpaintPipeline if self.is_inpainting else StableDiffusionPipeline
        return cls(
            vae=diffusers_vae(c["vae"], c["unet"].dtype),
            text_encoder=c["text_encoder"],
            tokenizer=c["tokenizer"],
            unet=c["unet"],
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def diffusers_vae(vae: Any, dtype: torch.dtype) -> Any:
    """The VAE a diffusers pipeline of these modules gets: velodiff keeps a force_upcast VAE in float32
    beside a float16 network (``vae_dtype_for``), but diffusers upcasts only a float16 VAE at decode and
    would feed float16 latents to it; such a pipeline gets a float16 copy, which it upcasts as its own."""
    if vae.dtype == dtype or vae_dtype_for(vae.config, dtype) != vae.dtype:
        return vae
    import copy

    return copy.deepcopy(vae).to(dtype)


def _negatives(prompts: list[str], negative: Sequence[str] | str | None) -> list[str]:
    if negative is None:
        return [""] * len(prompts)
    if isinstance(negative, str):
        return [negative] * len(prompts)
    negative = list(negative)
    if len(negative) == 1:
        return negative * len(prompts)
    if len(negative) != len(prompts):
        raise VelodiffError(
            f"{len(negative)} negative prompts for {len(prompts)} prompts; give one or one per prompt"
        )
    return negative


# --- detection ---------------------------------------------------------------------------------


def _is_sd_folder(src: Source) -> bool:
    if src.kind != "folder":
        return False
    if src.pipeline_class in SD_PIPELINES:
        return True
    idx = src.model_index
    return not src.pipeline_class and "unet" in idx and "text_encoder" in idx and "text_encoder_2" not in idx


def _sd2_unet(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("use_linear_projection")) or cfg.get("cross_attention_dim") == 1024


def detect_sd1(src: Source) -> bool:
    if src.kind == "folder":
        return _is_sd_folder(src) and not _sd2_unet(src.unet_config)
    return LDM_UNET_KEY in src.keys and src.has_key(SD1_TEXT_KEY) and not src.has_key("conditioner.")


def detect_sd2(src: Source) -> bool:
    if src.kind == "folder":
        return _is_sd_folder(src) and _sd2_unet(src.unet_config)
    return LDM_UNET_KEY in src.keys and src.has_key(SD2_TEXT_KEY) and not src.has_key("conditioner.")


# --- building ----------------------------------------------------------------------------------


def scheduler_setup(sched_cfg: dict[str, Any], prediction_type: str | None) -> tuple[DiscreteVP, str]:
    """The schedule and prediction type from a diffusers scheduler config (override wins)."""
    if "beta_schedule" not in sched_cfg and "trained_betas" not in sched_cfg and sched_cfg:
        raise VelodiffError(
            f"scheduler {sched_cfg.get('_class_name', '?')} has no beta schedule; "
            "this family needs a DDPM-type one"
        )
    schedule = DiscreteVP.from_diffusers_config(sched_cfg or {"beta_schedule": "scaled_linear"})
    return schedule, prediction_type or str(sched_cfg.get("prediction_type", "epsilon"))


def default_grid_for(sched_cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """DPM++ 2M with Karras times (the common 'DPM++ 2M Karras'); zero-terminal-SNR models use
    diffusers' 'trailing' spacing, which starts at the last trained step (Lin et al. 2023, Sec. 3.3)."""
    if sched_cfg.get("rescale_betas_zero_snr"):
        return "trailing", {}
    return "karras", {}


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    module.eval().requires_grad_(False)
    return module


def vae_dtype_for(vae_cfg: dict[str, Any] | Any, dtype: torch.dtype) -> torch.dtype:
    """float16 VAEs that overflow (SDXL's: config force_upcast) decode in float32, as diffusers does."""
    force = (
        vae_cfg.get("force_upcast", False)
        if isinstance(vae_cfg, dict)
        else getattr(vae_cfg, "force_upcast", False)
    )
    return torch.float32 if dtype == torch.float16 and force else dtype


def read_folder_modules(
    src: Source, dtype: torch.dtype, device: torch.device, *, text_encoders: Sequence[tuple[str, str, Any]]
) -> dict[str, Any]:
    """unet, vae, scheduler_config and the named (text_encoder, tokenizer, class) triples of a folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    c: dict[str, Any] = {}
    c["unet"] = place(
        from_pretrained(UNet2DConditionModel, src.path, "unet", torch_dtype=dtype),
        device,
    )
    vae_cfg = src.config("vae")
    c["vae"] = place(
        from_pretrained(AutoencoderKL, src.path, "vae"),
        device,
        vae_dtype_for(vae_cfg, dtype),
    )
    for te_name, tok_name, cls in text_encoders:
        if (
            te_name in src.model_index
            and src.model_index[te_name]
            and src.model_index[te_name][0] is not None
        ):
            c[te_name] = place(
                from_pretrained(cls, src.path, te_name, dtype=dtype), device
            )
            c[tok_name] = load_clip_tokenizer(src.path, tok_name)
        else:
            c[te_name], c[tok_name] = None, None
    c["scheduler_config"] = src.config("scheduler")
    return c


def read_single_file(
    src: Source, pipeline_cls: Any, config_dir: Path, dtype: torch.dtype, device: torch.device,
    given: bool = False,
) -> dict[str, Any]:
    """A single original-layout checkpoint through diffusers' from_single_file, configs from config_dir."""
    try:
        pipe = (
            from_single_file(
                pipeline_cls,
                src.path,
                config=str(config_dir),
                torch_dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
            )
            if "XL" not in pipeline_cls.__name__
            else from_single_file(pipeline_cls, src.path, config=str(config_dir), torch_dtype=dtype)
        )
    except VelodiffError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers and transformers fail in many ways (one line each)
        msg = first_line(e)
        msg = msg.split(". If you want")[0].replace("Cannot load  because ", "")
        if isinstance(e, KeyError):  # a weight the configs' architecture has and the file has not
            msg = f"the configs' architecture needs the weight {e.args[0]!r}, which the file has not"
        advice = (
            "the file is of another architecture than that folder (or --family)" if given else
            "if it is not a standard checkpoint of that architecture, pass config= (CLI: --config) a local "
            "diffusers folder of its own"
        )
        raise VelodiffError(f"cannot load {src.path.name} with the configs in {config_dir} ({msg}); {advice}"
                            ) from None
    c: dict[str, Any] = {
        k: v
        for k, v in pipe.components.items()
        if k in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    }
    for name, module in c.items():
        params = module.named_parameters() if hasattr(module, "named_parameters") else []
        missing = [k for k, v in params if v.is_meta]
        if missing:
            kind = pipeline_cls.__name__.removesuffix("Pipeline")
            raise VelodiffError(
                f"{src.path.name} has no weights for {name} ({missing[0]}, ...); "
                f"is it a {kind} checkpoint of the architecture in {config_dir}?"
            )
    for k in ("unet", "text_encoder", "text_encoder_2"):
        if c.get(k) is not None:
            place(c[k], device, dtype)
    place(c["vae"], device, vae_dtype_for(c["vae"].config, dtype))
    c["scheduler_config"] = dict(pipe.scheduler.config)
    return c


def build_sd(
    src: Source,
    *,
    family: str,
    dtype: torch.dtype,
    device: torch.device,
    prediction_type: str | None = None,
    config: Path | None = None,
) -> SDModel:
    from transformers import CLIPTextModel

    if src.kind == "folder":
        c = read_folder_modules(
            src, dtype, device, text_encoders=[("text_encoder", "tokenizer", CLIPTextModel)]
        )
        if c["text_encoder"] is None:
            raise VelodiffError(f"{src.path} has no text_encoder/; a Stable Diffusion folder needs one")
    else:
        from diffusers import StableDiffusionPipeline

        from .configs import single_file_config

        cfg_dir = single_file_config(family, src, config)
        c = read_single_file(src, StableDiffusionPipeline, cfg_dir, dtype, device, given=config is not None)
        if prediction_type is None:
            prediction_type = single_file_prediction_type(src)
    schedule, ptype = scheduler_setup(c["scheduler_config"], prediction_type)
    unet, vae = c["unet"], c["vae"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * factor
    grid, grid_opts = default_grid_for(c["scheduler_config"])
    return SDModel(
        family=family,
        schedule=schedule,
        prediction_type=ptype,
        denoiser=NetworkDenoiser(UNetNetwork(unet), schedule, ptype),
        latent_channels=int(vae.config.latent_channels),
        vae_scale_factor=factor,
        default_size=(size, size),
        default_steps=25,
        default_guidance=7.5,
        default_solver="dpmpp_2m",
        default_grid=grid,
        default_grid_options=grid_opts,
        components=c,
        device=device,
        dtype=dtype,
        max_tokens=int(min(c["tokenizer"].model_max_length, 10_000)),
    )


def single_file_prediction_type(src: Source) -> str | None:
    """A single file's prediction type from its ModelSpec metadata, if it states one."""
    meta = src.metadata.get("modelspec.prediction_type", "")
    return {"v": "v_prediction", "epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction"}.get(
        meta
    )


register_family(
    "sd1",
    detect_sd1,
    lambda src, **kw: build_sd(src, family="sd1", **kw),
    priority=10,
    description="Stable Diffusion 1.x (CLIP ViT-L text encoder)",
    expected_keys=(LDM_UNET_KEY, SD1_TEXT_KEY + "text_model.*"),
)
register_family(
    "sd2",
    detect_sd2,
    lambda src, **kw: build_sd(src, family="sd2", **kw),
    priority=11,
    description="Stable Diffusion 2.x (OpenCLIP ViT-H text encoder; 768-px models predict v)",
    expected_keys=(LDM_UNET_KEY, SD2_TEXT_KEY + "*"),
)
