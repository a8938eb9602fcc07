"""Mask <-> latent codec (method.md section 2): the one place (training, inference, the VAE mask study) that knows
how a mask becomes a VAE latent and back.

A mask ``m`` in [0, 1] is encoded as ``2m - 1`` replicated to 3 channels (VAE pixels are ``[B, 3, H, W]`` in
[-1, 1]), through the posterior *mean* (no sampling), times ``vae.config.scaling_factor``. A latent is decoded with
``D(z / scaling_factor)``, averaged over the channels, clamped to [-1, 1] and mapped to [0, 1]; or, with a light
`DiGSegMaskDecoder` (trained on the scaled latents), as the sigmoid of its logits. ``AutoencoderKL`` and
``AutoencoderTiny`` (a deterministic encoder) are both accepted.
"""

from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "scaling_factor",
    "encode_pixels",
    "decode_pixels",
    "masks_to_pixels",
    "encode_masks",
    "decode_mask_channels",
    "mask_channels_to_probabilities",
    "decode_masks",
]


def scaling_factor(vae) -> float:
    """The factor that brings the VAE's latents to roughly unit variance (1.0 when the config has none)."""
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def compute_dtype(model) -> torch.dtype:
    """The dtype `model` computes in: diffusers' ``model.dtype`` without its walk over every submodule for a
    layerwise-casting hook (2 ms per pipeline call for the demo U-Net). Only the first module holding parameters
    is asked: layerwise casting hooks every weighted layer but the norms and projections it skips, and the first
    (``conv_in``) is none of those. Models with ``_keep_in_fp32_modules`` get diffusers' full answer."""
    if not isinstance(model, torch.nn.Module):  # a duck-typed codec (encode / decode / dtype), as in the VAE study
        return getattr(model, "dtype", torch.float32)
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.dtype
    for module in model.modules():
        parameters = [p for p in module._parameters.values() if p is not None]
        if not parameters:
            continue
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            return hook.compute_dtype
        floating = [p.dtype for p in parameters if p.is_floating_point()]
        if floating:
            return floating[0]
    return model.dtype if hasattr(model, "dtype") else torch.float32


def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Encode ``[B, 3, H, W]`` pixels in [-1, 1] into scaled latents (posterior mean, never a sample)."""
    encoded = vae.encode(pixels.to(dtype=compute_dtype(vae)))
    if hasattr(encoded, "latent_dist"):
        latents = encoded.latent_dist.mode()
    elif hasattr(encoded, "latents"):
        latents = encoded.latents
    else:  # a plain tuple from return_dict=False style encoders
        latents = encoded[0]
        latents = latents.mode() if hasattr(latents, "mode") else latents
    return latents * scaling_factor(vae)


def decode_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents into ``[B, 3, H, W]`` pixels (nominally in [-1, 1], not clamped)."""
    return vae.decode(latents.to(dtype=compute_dtype(vae)) / scaling_factor(vae), return_dict=False)[0]


def masks_to_pixels(masks: torch.Tensor) -> torch.Tensor:
    """Map masks ``[B, H, W]`` or ``[B, 1, H, W]`` in [0, 1] to VAE input ``[B, 3, H, W]`` in [-1, 1]."""
    if masks.dim() == 3:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B,H,W] or [B,1,H,W]; got shape {tuple(masks.shape)}")
    pixels = masks.float() * 2.0 - 1.0
    return pixels.expand(-1, 3, -1, -1)


def encode_masks(vae, masks: torch.Tensor) -> torch.Tensor:
    """Encode masks in [0, 1] (``[B, H, W]`` or ``[B, 1, H, W]``) into scaled mask latents."""
    return encode_pixels(vae, masks_to_pixels(masks).to(device=vae.device))


def decode_mask_channels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode mask latents to the raw 3-channel output in [-1, 1] space (for channel-spread studies)."""
    return decode_pixels(vae, latents).float()


def mask_channels_to_probabilities(channels: torch.Tensor) -> torch.Tensor:
    """Reduce decoded ``[B, 3, H, W]`` mask channels to probabilities ``[B, 1, H, W]`` in [0, 1]."""
    return (channels.mean(dim=1, keepdim=True).clamp(-1.0, 1.0) + 1.0) / 2.0


def decode_masks(vae, latents: torch.Tensor, mask_decoder=None) -> torch.Tensor:
    """Decode mask latents into probabilities ``[B, 1, H, W]`` in [0, 1].

    With `mask_decoder` (a `DiGSegMaskDecoder` trained on this VAE's scaled mask latents) the light decoder's
    logits replace the VAE decoder: probabilities are their sigmoid. The VAE is then not run at all.
    """
    if mask_decoder is not None:
        param = next(mask_decoder.parameters())
        logits = mask_decoder(latents.to(device=param.device, dtype=param.dtype))
        return torch.sigmoid(logits.float())
    return mask_channels_to_probabilities(decode_mask_channels(vae, latents))
