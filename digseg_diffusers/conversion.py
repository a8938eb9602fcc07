"""From a text-to-image Stable Diffusion checkpoint to an untrained DiGSeg pipeline: the conversion and its surgery.

`DiGSegPipeline.from_base_model` calls `components_from_base_model`; the one change to pretrained weights is the
8-channel `conv_in` (`widen_conv_in`, method.md section 1). Training then starts from these components.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils import logging
from torch import nn
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer, PreTrainedModel

from .hub.files import hub_kwargs, require_hub_source
from .text_projection import DiGSegTextProjection

logger = logging.get_logger(__name__)


def components_from_base_model(
    base_model: str | os.PathLike,
    text_encoder: str | os.PathLike | PreTrainedModel | None = None,
    tokenizer: str | os.PathLike | Any | None = None,
    text_projection_hidden_features: int | None = None,
    torch_dtype: torch.dtype | None = None,
    **kwargs,
) -> dict[str, Any]:
    """The `DiGSegPipeline` constructor arguments built from a base checkpoint (see `from_base_model`)."""
    # Fail in seconds with one line (offline, uncached) rather than after ~30 s of Hub retries per file.
    sources = {"the base model": base_model, "the text encoder": text_encoder, "the tokenizer": tokenizer}
    for what, source in sources.items():
        if isinstance(source, (str, os.PathLike)):
            require_hub_source(source, what, **hub_kwargs(kwargs))
    base_model = str(base_model)
    load_kwargs = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["torch_dtype"] = torch_dtype
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **load_kwargs)
    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae", **load_kwargs)
    scheduler = DDIMScheduler.from_pretrained(
        base_model,
        subfolder="scheduler",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        **kwargs,
    )
    if scheduler.config.get("rescale_betas_zero_snr", False) and scheduler.config.prediction_type == "epsilon":
        logger.warning(
            "The base scheduler uses zero terminal SNR with epsilon prediction: the first DDIM step at t=999 is "
            "not finite. Use a v-prediction base or set `rescale_betas_zero_snr=False`."
        )

    def load_text_model(source: str, subfolder: str | None):
        extra = {"subfolder": subfolder} if subfolder else {}
        try:
            return CLIPTextModel.from_pretrained(source, **extra, **load_kwargs)
        except (ValueError, TypeError, OSError, KeyError) as clip_error:
            try:
                return AutoModel.from_pretrained(source, **extra, **load_kwargs)
            except Exception:
                raise clip_error from None

    def load_tokenizer(source: str, subfolder: str | None, model: PreTrainedModel):
        # CLIP tokenizers are loaded by class: AutoTokenizer would look for a root config.json that SD-layout
        # repos do not have, which fails offline.
        extra = {"subfolder": subfolder} if subfolder else {}
        tokenizer_class = CLIPTokenizer if isinstance(model, CLIPTextModel) else AutoTokenizer
        return tokenizer_class.from_pretrained(source, **extra, **kwargs)

    if text_encoder is None or isinstance(text_encoder, (str, os.PathLike)):
        own = text_encoder is None  # the base's text_encoder/ and tokenizer/ subfolders
        source = base_model if own else str(text_encoder)
        text_encoder = load_text_model(source, "text_encoder" if own else None)
        if tokenizer is None:
            tokenizer = load_tokenizer(source, "tokenizer" if own else None, text_encoder)
    if tokenizer is None:
        raise ValueError("`tokenizer` is required when `text_encoder` is given as a model instance.")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer), None, text_encoder)

    latent_channels = vae.config.latent_channels
    widen_conv_in(unet, latent_channels=latent_channels)
    text_projection = DiGSegTextProjection(
        in_features=text_encoder.config.hidden_size,
        out_features=unet.config.cross_attention_dim,
        hidden_features=text_projection_hidden_features,
    ).to(dtype=unet.dtype)
    return {
        "unet": unet,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_projection": text_projection,
        "base_model": base_model,
    }


def widen_conv_in(unet: UNet2DConditionModel, latent_channels: int = 4) -> UNet2DConditionModel:
    """Make `conv_in` take ``[z_x, z_y]`` (2 x `latent_channels`) instead of `latent_channels` inputs.

    The pretrained kernel is duplicated along the input axis and halved (method.md section 1), so that on
    ``[z, z]`` the new layer reproduces the old layer on ``z`` and the base model's response is kept.
    A U-Net that already takes 2 x `latent_channels` inputs is returned unchanged.
    """
    old = unet.conv_in
    if old.in_channels == 2 * latent_channels:
        return unet
    if old.in_channels != latent_channels:
        raise ValueError(
            f"`unet.conv_in` takes {old.in_channels} channels; expected {latent_channels} (a text-to-image U-Net) "
            f"or {2 * latent_channels} (already a DiGSeg U-Net)."
        )
    new = nn.Conv2d(
        2 * latent_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, old.weight], dim=1) / 2.0)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=2 * latent_channels)
    return unet
