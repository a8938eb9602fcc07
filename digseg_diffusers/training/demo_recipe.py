"""The demo model's architecture: a small SD2-layout U-Net over a 4x VAE, a character-level CLIP, DDIM.

`training/train_demo_model.py` builds the untrained pipeline with `build_untrained_pipeline` and trains it; tests and
benchmarks build the same U-Net with `build_demo_unet`. What the shipped model is: `hub_cards/demo_model_card.md`.
"""

from __future__ import annotations

import os

import torch

# SD2's layout: 4 levels, plain bottom level, text cross-attention in the others and in the mid block. What the
# full-resolution level gets is `--full_resolution_attention`: SD2's self- + cross-attention ("full", the default),
# cross-attention only ("cross": diffusers' `only_cross_attention`, the previous model's choice, made when 16 heads of
# 2 channels made that level's 256-token self-attention cost more than the rest of the U-Net), or nothing ("none").
FULL_RESOLUTION_ATTENTION = ("none", "cross", "full")
DEFAULT_FULL_RESOLUTION_ATTENTION = "full"  # the shipped model's layout (SD2's)
# 4x VAE (2 downsamplings) then a 4-level U-Net (3 more): the image side must divide by 2 ** 5.
RESOLUTION_MULTIPLE = 32
DEMO_UNET_CHANNELS = (32, 64, 96, 96)
UNET_NORM_GROUPS = 16  # GroupNorm groups in every U-Net level: each level's width must be a multiple
DEFAULT_ATTENTION_HEAD_CHANNELS = 16
# 1-step inference only asks at t = T-1, so the demo's training timesteps are biased to the high-noise end.
DEMO_TIMESTEP_BIAS = dict(timestep_bias_strategy="later", timestep_bias_multiplier=1000.0, timestep_bias_portion=0.01)


def demo_block_types(full_resolution_attention: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[bool, ...]]:
    """Down block types, up block types and `only_cross_attention` of the demo U-Net."""
    if full_resolution_attention not in FULL_RESOLUTION_ATTENTION:
        raise ValueError(f"full_resolution_attention must be one of {FULL_RESOLUTION_ATTENTION}, got {full_resolution_attention!r}")
    top_down, top_up = ("DownBlock2D", "UpBlock2D") if full_resolution_attention == "none" else ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
    down = (top_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", top_up)
    only_cross_attention = (full_resolution_attention == "cross", False, False, False)
    return down, up, only_cross_attention


def attention_heads_per_level(unet_channels: tuple[int, ...], head_channels: int | None) -> int | tuple[int, ...]:
    """Attention heads of each U-Net level for `head_channels` channels per head (None: 16 heads everywhere).

    diffusers' `attention_head_dim` is, for `UNet2DConditionModel`, the number of heads (SD2: 5, 10, 20, 20 heads
    of 64 channels). 16 heads on 32-96 channels are 2-6 channels wide: on a CPU such heads cost more than the rest
    of the U-Net, and a 2-dimensional query-key product can rank keys in few ways.
    """
    if head_channels is None:
        return 16
    if head_channels < 1 or any(channels % head_channels for channels in unet_channels):
        raise ValueError(f"attention head channels {head_channels} must divide every level's width {tuple(unet_channels)}")
    return tuple(channels // head_channels for channels in unet_channels)


def demo_scheduler():
    """DDIM (trailing, v-prediction) over DDPM's linear betas rescaled to zero terminal SNR.

    SD2's scaled-linear betas leave the mask readable in the noisy latent up to t ~ 900 (SNR 0.12 at t = 900):
    a model trained from scratch then learns to denoise from ``z_t`` alone and ignores the image latent, and the
    1-step prediction from pure noise stays a blur (measured: identical outputs for the true and a shuffled
    image after 2000 steps). Linear betas with zero terminal SNR make ~40% of the timesteps (SNR < 0.15)
    answerable only from the image, and the first trailing step starts from pure noise, as at inference.
    """
    from diffusers import DDIMScheduler

    from digseg_diffusers.testing_utils import make_ddim_scheduler

    return DDIMScheduler.from_config(
        make_ddim_scheduler("v_prediction").config,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        rescale_betas_zero_snr=True,
    )


def build_demo_unet(
    latent_channels: int,
    latent_size: int,
    unet_channels: tuple[int, ...] = DEMO_UNET_CHANNELS,
    attention_head_channels: int | None = DEFAULT_ATTENTION_HEAD_CHANNELS,
    cross_attention_dim: int = 64,
    full_resolution_attention: str = DEFAULT_FULL_RESOLUTION_ATTENTION,
):
    """The demo's randomly initialised U-Net: input ``[z_x, z_t]``, output a mask latent (seed torch first)."""
    from diffusers import UNet2DConditionModel

    down_block_types, up_block_types, only_cross_attention = demo_block_types(full_resolution_attention)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        only_cross_attention=only_cross_attention,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        attention_head_dim=attention_heads_per_level(unet_channels, attention_head_channels),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=UNET_NORM_GROUPS,
    )


def build_untrained_pipeline(
    vae_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    unet_channels: tuple[int, ...] = DEMO_UNET_CHANNELS,
    attention_head_channels: int | None = DEFAULT_ATTENTION_HEAD_CHANNELS,
    text_width: int = 64,
    cross_attention_dim: int = 64,
    text_layers: int = 2,
    processing_resolution: int = 64,
    full_resolution_attention: str = DEFAULT_FULL_RESOLUTION_ATTENTION,
    seed: int = 0,
):
    """Assemble and save the demo pipeline before training (every weight random except the trained VAE).

    The text encoder is a randomly initialised CLIP text transformer over the character-level tokenizer: it stays
    frozen (as DiGSeg's CLIP does) and still maps every class name to a distinct, deterministic token sequence;
    the trainable `text_projection` learns to read it.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from digseg_diffusers import DiGSegPipeline
    from digseg_diffusers.text_projection import DiGSegTextProjection
    from digseg_diffusers.data.synthetic import SHAPE_CLASSES
    from digseg_diffusers.tokenization import build_char_clip_tokenizer

    vae = AutoencoderKL.from_pretrained(vae_dir)
    latent_channels = vae.config.latent_channels
    latent_size = processing_resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed)
    unet = build_demo_unet(
        latent_channels, latent_size, unet_channels, attention_head_channels, cross_attention_dim, full_resolution_attention
    )
    tokenizer = build_char_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    text_projection = DiGSegTextProjection(text_width, cross_attention_dim)
    pipe = DiGSegPipeline(
        unet=unet,
        vae=vae,
        scheduler=demo_scheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_projection=text_projection,
        default_denoising_steps=1,
        default_processing_resolution=processing_resolution,
        default_mask_threshold=0.5,
        base_model="digseg-demo (trained from scratch on digseg_diffusers.data.synthetic)",
        training_vocabulary=list(SHAPE_CLASSES),
    )
    pipe.save_pretrained(output_dir)
    return pipe
