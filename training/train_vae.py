#!/usr/bin/env python
"""Train the small `AutoencoderKL` of the embedded demo model on synthetic shape scenes *and* their masks.

    python training/train_vae.py --output_dir runs/demo/vae

DiGSeg's frozen VAE must round-trip binary masks almost losslessly (method.md section 2; SD's VAE: MAE 0.004), and
no SD VAE can be downloaded here: so every batch mixes train-split scenes with masks encoded as
`digseg_diffusers.mask_codec` encodes them. The loss is L1 + MSE plus a small KL term (no GAN or perceptual loss
is needed for flat shapes). `vae.config.scaling_factor` is then set to ``1 / std`` of the latents of held-out
images and masks, so that the diffusion target has unit variance.

Also the stand-in for a trained SD-like 8x VAE that `benchmarks/performance/bench_mask_decoder.py` compares the light
mask decoder with (a random VAE does not reproduce masks):

    python training/train_vae.py --output_dir OUT/quick_vae --block_out_channels 32 64 64 64 --crop_size 0 \
        --max_train_steps 3000 --max_minutes 18
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import torch
from diffusers import AutoencoderKL

from digseg_diffusers import mask_codec
from digseg_diffusers.evaluation.metrics import binary_segmentation_metrics
from digseg_diffusers.data.synthetic import split_scene_tensors

logger = logging.getLogger("train_vae")


def build_vae(block_out_channels: tuple[int, ...], latent_channels: int = 4, sample_size: int = 64) -> AutoencoderKL:
    """An SD-style `AutoencoderKL`; it downsamples by ``2 ** (len(block_out_channels) - 1)``."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(16, min(block_out_channels)),
        sample_size=sample_size,
        scaling_factor=1.0,
    )


class SceneBank:
    """A split's scenes with their images in [-1, 1] and label maps, made once (thousands of 64 px scenes fit)."""

    def __init__(self, num_scenes: int, size: int, split: str = "train"):
        self.scenes, self.images, self.labels = split_scene_tensors(split, num_scenes, size)

    def sample(self, batch_size: int, generator: torch.Generator, crop_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of images and a batch of masks in VAE pixel space ([-1, 1], 3 channels), randomly flipped and
        cropped to `crop_size` (the VAE is convolutional: small crops train it at a fraction of the cost)."""
        n = self.images.shape[0]
        image_index = torch.randint(0, n, (batch_size,), generator=generator)
        images = self.images[image_index]
        mask_index = torch.randint(0, n, (batch_size,), generator=generator)
        labels = self.labels[mask_index]
        # one present class per mask (background counts too: it is the complement of all shapes)
        masks = []
        for label in labels:
            values = torch.unique(label)
            value = values[torch.randint(0, len(values), (1,), generator=generator)]
            masks.append((label == value).float())
        masks = torch.stack(masks)
        empty = torch.rand(batch_size, generator=generator) < 0.05  # empty masks (absent classes) must stay empty
        masks[empty] = 0.0
        mask_pixels = mask_codec.masks_to_pixels(masks)
        batch = torch.cat([images, mask_pixels])
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        size = batch.shape[-1]
        if crop_size and crop_size < size:
            top, left = torch.randint(0, size - crop_size + 1, (2,), generator=generator).tolist()
            batch = batch[..., top : top + crop_size, left : left + crop_size]
        return batch[:batch_size], batch[batch_size:]


@torch.no_grad()
def measure(vae: AutoencoderKL, images: torch.Tensor, masks: torch.Tensor) -> dict:
    """Latent std (for the scaling factor), image reconstruction MAE, and the mask round trip (MAE, IoU at 0.5)."""
    vae.eval()
    image_latents = mask_codec.encode_pixels(vae, images) / mask_codec.scaling_factor(vae)
    mask_latents = mask_codec.encode_masks(vae, masks) / mask_codec.scaling_factor(vae)
    reconstruction = mask_codec.decode_pixels(vae, image_latents * mask_codec.scaling_factor(vae)).clamp(-1, 1)
    probabilities = mask_codec.decode_masks(vae, mask_latents * mask_codec.scaling_factor(vae))
    all_latents = torch.cat([image_latents, mask_latents])
    return {
        "latent_std": float(all_latents.std()),
        "latent_mean": float(all_latents.mean()),
        "mask_latent_std": float(mask_latents.std()),
        "image_latent_std": float(image_latents.std()),
        "image_mae": float((reconstruction - images).abs().mean() / 2),  # in [0, 1] units
        "mask_mae": float((probabilities - masks.unsqueeze(1)).abs().mean()),
        "mask_iou": binary_segmentation_metrics(probabilities > 0.5, masks.bool().unsqueeze(1))["iou"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the demo model's small AutoencoderKL on synthetic scenes and masks.")
    parser.add_argument("--output_dir", required=True, help="Folder for the VAE (save_pretrained) and vae_summary.json.")
    parser.add_argument("--resolution", type=int, default=64, help="Scene side in pixels.")
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 32], help="One entry per level; the VAE downsamples by 2**(levels-1).")
    parser.add_argument("--latent_channels", type=int, default=4, help='Latent channels (the U-Net then takes twice as many).')
    parser.add_argument("--crop_size", type=int, default=32, help="Train on random crops of this side (0 = whole scenes).")
    parser.add_argument("--num_scenes", type=int, default=2000, help="Train-split scenes to draw images and masks from.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Images per step (plus as many masks).")
    parser.add_argument("--max_train_steps", type=int, default=3000, help='Optimizer steps.')
    parser.add_argument("--learning_rate", type=float, default=1e-3, help='Peak AdamW learning rate (warm-up, cosine to 10 %%).')
    parser.add_argument("--kl_weight", type=float, default=1e-6, help='Weight of the KL term (small: the latent only needs to be decodable).')
    parser.add_argument("--mask_loss_weight", type=float, default=1.0, help="Weight of the mask reconstruction loss relative to the image loss.")
    parser.add_argument("--num_eval_scenes", type=int, default=64, help="Scenes (from the val split) for the final measurements.")
    parser.add_argument("--seed", type=int, default=0, help='Seed of the scenes and the initialisation.')
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--max_minutes", type=float, default=None,
                        help="Stop after this many minutes of training, even before --max_train_steps (the learning "
                        "rate schedule stays planned for --max_train_steps; default: no limit).")
    args = parser.parse_args(argv)
    for name in ("resolution", "latent_channels", "num_scenes", "train_batch_size", "max_train_steps", "num_eval_scenes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    vae = build_vae(tuple(args.block_out_channels), args.latent_channels, args.resolution)
    logger.info(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()):,} parameters, "
                f"downsampling {2 ** (len(args.block_out_channels) - 1)}x")
    bank = SceneBank(args.num_scenes, args.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warmup = min(100, args.max_train_steps // 10)

    def learning_rate_factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.max_train_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    start = time.time()
    history = []
    vae.train()
    for step in range(args.max_train_steps):
        images, masks = bank.sample(args.train_batch_size, generator, args.crop_size)
        batch = torch.cat([images, masks])
        posterior = vae.encode(batch).latent_dist
        # the posterior mean is what DiGSeg encodes with; sampling during training keeps the decoder robust
        reconstruction = vae.decode(posterior.sample(generator=None)).sample
        error = reconstruction - batch
        per_item = error.abs().mean(dim=(1, 2, 3)) + (error**2).mean(dim=(1, 2, 3))
        n = images.shape[0]
        reconstruction_loss = per_item[:n].mean() + args.mask_loss_weight * per_item[n:].mean()
        kl = posterior.kl().mean() / (batch.shape[-1] * batch.shape[-2])
        loss = reconstruction_loss + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        if step % 25 == 0 or step == args.max_train_steps - 1:
            history.append((step, loss.item()))
            logger.info(f"step {step:5d}  loss {loss.item():.4f}  image {float(per_item[:n].mean()):.4f}  "
                        f"mask {float(per_item[n:].mean()):.4f}  {time.time() - start:.0f}s")
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            logger.info(f"stopping after {step + 1} steps: --max_minutes {args.max_minutes} reached")
            break
    train_seconds = time.time() - start

    # Measure on validation scenes (never trained on), then fix the scaling factor from the latent std.
    held_out = SceneBank(args.num_eval_scenes, args.resolution, split="val")
    masks = [torch.from_numpy(scene.mask(index)).float() for scene in held_out.scenes for index in scene.class_indices]
    metrics = measure(vae, held_out.images.contiguous(), torch.stack(masks))  # contiguous: as measured so far
    vae.register_to_config(scaling_factor=round(1.0 / metrics["latent_std"], 5))
    logger.info(f"validation: {metrics}; scaling_factor {vae.config.scaling_factor}")
    vae.save_pretrained(args.output_dir)
    summary = {
        "args": vars(args),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "steps": step + 1,
        "train_seconds": train_seconds,
        "scaling_factor": vae.config.scaling_factor,
        "validation": metrics,
        "losses": history,
    }
    with open(os.path.join(args.output_dir, "vae_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
