"""Turning a text-to-image U-Net into a DiGSeg U-Net: the 8-channel `conv_in`."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn


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
