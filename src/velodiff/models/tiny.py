"""Tiny random-weight models of the real architectures, saved as diffusers folders, for tests and
benchmarks: the same diffusers / transformers classes as Stable Diffusion 1.5, SDXL, SD3, Flux and
PixArt with every width and depth scaled down, and tokenizers built offline (a byte-level CLIP BPE
and a T5-style Unigram over a few words). Nothing is downloaded.

    from velodiff.models.tiny import save_tiny
    path = save_tiny("sd3", "/tmp/tiny-sd3")      # then velodiff.models.load(path)

Images are 64 x 64 by default (a 3-level VAE, factor 4, gives 16 x 16 latents), except Flux's: its
loader takes FluxPipeline's default of 512 px (128 x 128 latents), so pass height / width = 64 there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..schedules import SD_SCHEDULER
from .configs import bytes_to_unicode as _bytes_to_unicode

#: words with whole-word tokens in both tokenizers (anything else is spelled out)
WORDS = (
    "a",
    "an",
    "the",
    "photo",
    "of",
    "on",
    "in",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "cube",
    "sphere",
    "circle",
    "square",
    "triangle",
    "table",
    "garden",
    "blurry",
    "ugly",
    "painting",
)
IMAGE_SIZE = 64


def clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIPTokenizer: byte alphabet (with and without the word-end mark), merges that make each of
    WORDS one token, and CLIP's start / end tokens (pad = end, as CLIP-L)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 tokenizer (SentencePiece-style Unigram: pad 0, eos 1, unk 2, '▁'-prefixed words) over WORDS
    and single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = (
        ["<pad>", "</s>", "<unk>", "▁"]
        + ["▁" + w for w in WORDS]
        + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    )
    scores = [0.0, 0.0, 0.0, -2.0] + [-1.0] * len(WORDS) + [-3.0] * (len(pieces) - 4 - len(WORDS))
    tok = Tokenizer(models.Unigram(list(zip(pieces, scores, strict=True)), unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" +", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def clip_text(tok: Any, hidden: int, projection: int | None = None, seed: int = 0) -> Any:
    """CLIPTextModel (or WithProjection: SDXL's / SD3's pooled output) over ``tok``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_encoder(tok: Any, d_model: int, seed: int = 0) -> Any:
    """T5EncoderModel with T5 v1.1's gated-GELU feed-forward, 2 layers."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 16,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5EncoderModel(cfg).eval()


def vae(
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    quant_conv: bool = True,
    force_upcast: bool = False,
    seed: int = 0,
) -> Any:
    """AutoencoderKL with 3 levels (factor 4); SD3 / Flux's have no quant convs and a shift factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
        force_upcast=force_upcast,
        mid_block_add_attention=True,
    ).eval()


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Add small noise to the weights: freshly initialised networks have near-constant outputs,
    which would make parity checks weak."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()




def sd15() -> Any:
    """Stable Diffusion 1.5's architecture: UNet with cross-attention down/up blocks, CLIP-L-like encoder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = clip_tokenizer()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=clip_text(tok, 32, seed=2),
        tokenizer=tok,
        unet=_perturb(unet, 3),
        scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl() -> Any:
    """SDXL's architecture: UNet with text_time micro-conditioning, two CLIP encoders (2nd projected)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = clip_tokenizer()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=16,
    )
    return StableDiffusionXLPipeline(
        vae=vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip_text(tok, 32, seed=2),
        tokenizer=tok,
        text_encoder_2=clip_text(tok, 32, projection=32, seed=3),
        tokenizer_2=clip_tokenizer(),
        unet=_perturb(unet, 4),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER),
    )


def sd3(t5: bool = True) -> Any:
    """SD3.5-medium's architecture: MMDiT with a dual-attention block and RMS qk-norm; CLIP-L, CLIP-G
    (both projected) and T5; flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer()
    torch.manual_seed(1)
    tr = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    t5tok = t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=_perturb(tr, 2),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(16, 1.5305, 0.0609, quant_conv=False),
        text_encoder=clip_text(tok, 16, projection=16, seed=3),
        tokenizer=tok,
        text_encoder_2=clip_text(tok, 16, projection=16, seed=4),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(t5tok, 64, seed=5) if t5 else None,
        tokenizer_3=t5tok if t5 else None,
    )


def flux(guidance: bool = True) -> Any:
    """Flux.1's architecture: double- and single-stream blocks, 3-axis RoPE, 2x2-packed 16-channel
    latents, CLIP-L pooled + T5 context; dev (guidance input) or schnell (``guidance=False``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = clip_tokenizer()
    torch.manual_seed(1)
    tr = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=16,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    t5tok = t5_tokenizer()
    return FluxPipeline(
        transformer=_perturb(tr, 2),
        scheduler=sched,
        vae=vae(16, 0.3611, 0.1159, quant_conv=False),
        text_encoder=clip_text(tok, 16, seed=3),
        tokenizer=tok,
        text_encoder_2=t5_encoder(t5tok, 64, seed=4),
        tokenizer_2=t5tok,
    )


def pixart(alpha: bool = False) -> Any:
    """PixArt-sigma's architecture (``alpha=True``: PixArt-alpha 1024's, with resolution and aspect
    micro-conditioning): DiT with T5 cross-attention, eps + learned variance (8 output channels)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(1)
    tr = PixArtTransformer2DModel(
        num_attention_heads=3,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=48,
        sample_size=128 if alpha else IMAGE_SIZE // 4,
        patch_size=2,
        caption_channels=64,
        use_additional_conditions=alpha,
    )
    t5tok = t5_tokenizer()
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    return cls(
        transformer=_perturb(tr, 2),
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
        vae=vae(),
        text_encoder=t5_encoder(t5tok, 64, seed=3),
        tokenizer=t5tok,
    )


BUILDERS: dict[str, Callable[[], Any]] = {
    "sd15": sd15,
    "sdxl": sdxl,
    "sd3": sd3,
    "sd3-no-t5": lambda: sd3(t5=False),
    "flux": flux,
    "flux-schnell": lambda: flux(guidance=False),
    "pixart-sigma": pixart,
    "pixart-alpha": lambda: pixart(alpha=True),
}


def save_tiny(kind: str, path: str | Path) -> Path:
    """Build the tiny ``kind`` model (see BUILDERS), save it as a diffusers folder at ``path``, return it."""
    from ..errors import unknown_name

    if kind not in BUILDERS:
        raise unknown_name("tiny model", kind, BUILDERS)
    path = Path(path)
    BUILDERS[kind]().save_pretrained(str(path))
    return path
