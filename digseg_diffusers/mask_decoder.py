"""A lightweight mask decoder: mask latents -> mask logits, at a small fraction of the VAE decoder's cost.

DiGSeg decodes one latent per (image, prompt); the SD VAE's decode (~2.5 TFLOP per 512 px mask, more than the
U-Net and the image encode together) dominates with K prompts. A mask is one channel of flat regions and sharp
edges, which a few conv + upsample layers reproduce. The decoder is trained per VAE
(`training/train_mask_decoder.py`) on its *scaled* mask latents; `mask_codec.decode_masks` turns its logits into
probabilities, so the probability convention stays in the codec.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from .evaluation.metrics import binary_segmentation_metrics

__all__ = [
    "DiGSegMaskDecoder",
    "count_flops",
    "mask_iou",
    "fit_mask_decoder",
    "evaluate_mask_decoders",
]


class _ConvBlock(nn.Module):
    """Residual 3x3 conv + ReLU (the residual keeps a deep-but-thin stack trainable from scratch in minutes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class DiGSegMaskDecoder(ModelMixin, ConfigMixin):
    """Mask latents ``[B, latent_channels, h, w]`` -> mask logits ``[B, 1, h * 2**n, w * 2**n]``.

    ``n = len(block_out_channels) - 1`` nearest-neighbour x2 upsamplings (n = 3 for SD's 8x VAE); level i works
    at width ``block_out_channels[i]`` with `layers_per_block` residual conv blocks. Widths shrink as the
    resolution grows, which keeps the cost per level roughly constant and the total ~600x below SD's decoder
    (4.3 vs 2515 GFLOP per 512 px mask).

    Args:
        latent_channels: channels of the VAE latent (4 for SD).
        block_out_channels: width of each resolution level, latent resolution first.
        layers_per_block: residual conv blocks per level.
        input_scale: factor applied to the latents first; the training script sets it to 1 / (latent std) so a
            VAE whose `scaling_factor` does not give unit-variance latents still trains well.
    """

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (64, 32, 16, 8),
        layers_per_block: int = 1,
        input_scale: float = 1.0,
    ):
        super().__init__()
        if len(block_out_channels) < 1:
            raise ValueError("`block_out_channels` needs at least one width.")
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(latent_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(*[_ConvBlock(width) for _ in range(layers_per_block)]) for width in widths
        )
        self.upsamplers = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(len(widths) - 1)
        )
        self.conv_out = nn.Conv2d(widths[-1], 1, 3, padding=1)

    @property
    def upsampling_factor(self) -> int:
        """Output pixels per latent pixel along each side (8 for SD's VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled mask latents (as `mask_codec.encode_masks` returns them) -> logits ``[B, 1, H, W]``."""
        x = F.relu(self.conv_in(latents * self.config.input_scale))
        for i, level in enumerate(self.levels):
            x = level(x)
            if i < len(self.upsamplers):
                x = F.relu(self.upsamplers[i](F.interpolate(x, scale_factor=2.0, mode="nearest")))
        return self.conv_out(x)


# ------------------------ Measuring and training (used by training/train_mask_decoder.py, the benchmarks and the tests)


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call of ``fn(*args, **kwargs)`` by `torch.utils.flop_counter` (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def mask_iou(probabilities: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> float:
    """Pooled IoU (sum of intersections / sum of unions) of ``probabilities > threshold`` against binary targets."""
    return binary_segmentation_metrics(probabilities.reshape(targets.shape) > threshold, targets > 0.5)["iou"]


def fit_mask_decoder(
    decoder: DiGSegMaskDecoder,
    latents: torch.Tensor,
    masks: torch.Tensor,
    num_steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    latent_noise_std: float = 0.0,
    seed: int = 0,
    log_every: int = 0,
    logger=None,
) -> list[float]:
    """Train `decoder` to map `latents` ``[N, C, h, w]`` to `masks` ``[N, H, W]`` in {0, 1}; returns the losses.

    Loss: binary cross-entropy on the logits plus a soft Dice term (masks are often small; BCE alone would let
    the decoder shave their edges). `latent_noise_std` adds Gaussian noise to the latents during training, so
    the decoder also accepts the slightly off-manifold latents a one-step denoiser produces. AdamW with cosine
    decay; the batches are drawn with their own generator, so a run is reproducible.
    """
    if latents.shape[0] != masks.shape[0]:
        raise ValueError(f"`latents` has {latents.shape[0]} rows but `masks` has {masks.shape[0]}.")
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be positive; got {num_steps}.")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, num_steps) / num_steps))
    )
    masks = masks.float().reshape(masks.shape[0], 1, *masks.shape[-2:])
    decoder.train()
    losses = []
    for step in range(num_steps):
        index = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=generator)
        batch_latents, batch_masks = latents[index], masks[index]
        if latent_noise_std > 0:
            batch_latents = batch_latents + latent_noise_std * torch.randn(
                batch_latents.shape, generator=generator
            ).to(batch_latents)
        logits = decoder(batch_latents)
        probabilities = torch.sigmoid(logits)
        intersection = (probabilities * batch_masks).sum(dim=(1, 2, 3))
        total = probabilities.sum(dim=(1, 2, 3)) + batch_masks.sum(dim=(1, 2, 3))
        dice = 1.0 - (2 * intersection + 1.0) / (total + 1.0)
        loss = F.binary_cross_entropy_with_logits(logits, batch_masks) + dice.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if logger is not None and log_every and (step + 1) % log_every == 0:
            logger.info("step %d/%d loss %.4f", step + 1, num_steps, sum(losses[-log_every:]) / log_every)
    decoder.eval()
    return losses


@torch.no_grad()
def evaluate_mask_decoders(
    vae, mask_decoder: DiGSegMaskDecoder, masks: torch.Tensor, batch_size: int = 32, threshold: float = 0.5
) -> dict:
    """IoU of masks round-tripped through the VAE encoder and either decoder (full VAE, light), same latents.

    Returns ``{"iou_vae", "iou_light", "iou_difference_points", "num_masks"}`` (IoUs pooled over all masks;
    the difference is ``100 * (iou_light - iou_vae)``, i.e. in IoU points).
    """
    from . import mask_codec

    full, light = [], []
    for start in range(0, masks.shape[0], batch_size):
        batch = masks[start : start + batch_size].float()
        latents = mask_codec.encode_masks(vae, batch)
        full.append(mask_codec.decode_masks(vae, latents).cpu())
        light.append(mask_codec.decode_masks(vae, latents, mask_decoder=mask_decoder).cpu())
    targets = masks.float().reshape(masks.shape[0], 1, *masks.shape[-2:])
    iou_vae = mask_iou(torch.cat(full), targets, threshold)
    iou_light = mask_iou(torch.cat(light), targets, threshold)
    return {
        "num_masks": int(masks.shape[0]),
        "iou_vae": iou_vae,
        "iou_light": iou_light,
        "iou_difference_points": 100.0 * (iou_light - iou_vae),
    }
