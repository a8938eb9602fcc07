"""Train a small 8x `AutoencoderKL` on synthetic scenes and their masks, as a stand-in for a trained VAE.

The light mask decoder is compared with the decoder of a *trained* VAE (a random one does not reproduce masks).
Without Hub access, this makes one in minutes on a CPU: half of every batch are synthetic images, half masks in
the codec's ``2m - 1`` convention, reconstructed with L1 + a tiny KL term; `scaling_factor` then rescales the
latents to unit variance, as SD does.

    python -m benchmarks.performance.train_quick_mask_vae --output_dir OUT/quick_vae --max_steps 1500 --max_minutes 15
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from benchmarks.common import synthetic_scenes
from diffusers import AutoencoderKL

from digseg_diffusers import mask_codec


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_scenes", type=int, default=2000)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64, 64])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--max_minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_scenes(num_scenes: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, H, W]`` in [-1, 1] and every visible class mask ``[M, H, W]`` in {0, 1} of the train split."""
    images, scenes = synthetic_scenes("train", num_scenes, resolution)
    return images, torch.stack([torch.from_numpy(s.mask(c)) for s in scenes for c in s.class_indices]).float()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    widths = tuple(args.block_out_channels)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=args.resolution,
        scaling_factor=1.0,
    )
    images, masks = load_scenes(args.num_scenes, args.resolution)
    mask_pixels = mask_codec.masks_to_pixels(masks)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    half = args.batch_size // 2
    start, losses = time.time(), []
    for step in range(args.max_steps):
        batch = torch.cat(
            [
                images[torch.randint(0, images.shape[0], (half,), generator=generator)],
                mask_pixels[torch.randint(0, mask_pixels.shape[0], (args.batch_size - half,), generator=generator)],
            ]
        )
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = (reconstruction - batch).abs().mean() + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f} s)", flush=True)
        if time.time() - start > 60 * args.max_minutes:
            break
    vae.eval()
    with torch.no_grad():  # unit-variance latents, as SD's scaling_factor gives
        sample = torch.cat([mask_pixels[:256], images[:256]])
        std = float(vae.encode(sample).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    os.makedirs(args.output_dir, exist_ok=True)
    vae.save_pretrained(args.output_dir)
    summary = {"steps": len(losses), "final_loss": float(np.mean(losses[-50:])), "scaling_factor": 1.0 / std,
               "seconds": time.time() - start, "args": vars(args)}
    with open(os.path.join(args.output_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
