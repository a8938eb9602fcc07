"""Does the demo VAE's image latent limit the demo model? A probe with and without it.

The demo U-Net sees a scene only through its 8-channel 16 x 16 VAE latent, and the VAE's reconstructions are
visibly blurred (rounded corners, soft star points). If that latent lost what tells a square from a circle, no
U-Net recipe could reach the issue's mIoU target. The probe trains the demo U-Net's trunk (same layout, same
widths, same optimiser as the recipe) as a plain *discriminative* segmenter, all 7 labels at once with
cross-entropy, on two inputs of the same 16 x 16 size:

- ``latent``: the packaged demo VAE's image latent (what the DiGSeg U-Net gets);
- ``pixels``: the 64 x 64 scene rearranged losslessly into 48 channels (`pixel_unshuffle` by 4).

Equal mIoU means the latent keeps the shape information the trunk can use in this many steps; then the limit is
the training compute, not the VAE. Not DiGSeg itself (no text query, no diffusion), a diagnostic for it.

    python -m benchmarks.quality.demo_latent_probe --threads 2
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from benchmarks import common

from digseg_diffusers import mask_codec
from digseg_diffusers.data.synthetic import SHAPE_CLASSES, split_scene_tensors
from digseg_diffusers.evaluation.metrics import ConfusionMatrix
from digseg_diffusers.training.demo_recipe import build_demo_unet

QUALITY_RESULTS_DIR = os.path.join(common.ROOT, "benchmarks", "quality", "results")
NUM_LABELS = len(SHAPE_CLASSES) + 1  # the generator's label map: 0 = background, 1..6 = shapes
INPUTS = ("latent", "pixels")


def scenes(split: str, num_scenes: int, size: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] ``[N, 3, size, size]`` and label maps ``[N, size, size]`` of generated scenes."""
    _, pixels, labels = split_scene_tensors(split, num_scenes, size, first)
    return pixels, labels


@torch.no_grad()
def probe_input(kind: str, vae, scale_factor: int, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The VAE's image latent, or the pixels unshuffled onto the latent's grid (``scale_factor`` = the VAE's)."""
    if kind == "pixels":
        return F.pixel_unshuffle(pixels, scale_factor)
    return torch.cat([mask_codec.encode_pixels(vae, pixels[i : i + chunk]) for i in range(0, len(pixels), chunk)])


def train_and_score(kind, latent_channels: int, train_x, train_y, val_x, val_y, scale_factor: int, steps: int,
                    batch_size: int, seed: int) -> dict:
    """The demo trunk with a 7-label head on the latent grid (``scale_factor ** 2`` sub-pixels per cell,
    `pixel_shuffle`d back to the scene's pixels)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    trunk = build_demo_unet(latent_channels, train_x.shape[-1])  # the recipe's U-Net layout and widths
    config = dict(trunk.config, in_channels=train_x.shape[1], out_channels=NUM_LABELS * scale_factor**2)
    net = UNet2DConditionModel.from_config(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)  # the recipe's optimiser
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.03)
    no_text = torch.zeros(batch_size, 4, config["cross_attention_dim"])
    timestep = torch.full((batch_size,), 999)

    def logits(x):
        out = net(x, timestep[: len(x)], encoder_hidden_states=no_text[: len(x)], return_dict=False)[0]
        return F.pixel_shuffle(out, scale_factor)

    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    net.train()
    for step in range(steps):
        index = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        loss = F.cross_entropy(logits(train_x[index]), train_y[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"  {kind} step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start
    net.eval()
    confusion = ConfusionMatrix(NUM_LABELS)
    with torch.no_grad():
        for i in range(0, len(val_x), batch_size):
            confusion.update(logits(val_x[i : i + batch_size]).argmax(1), val_y[i : i + batch_size])
    metrics = confusion.compute()
    per_class = dict(zip(["background", *SHAPE_CLASSES], metrics["per_class_iou"]))
    return {"mIoU": metrics["mIoU"], "per_class": per_class, "train_seconds": seconds}


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_train_scenes", type=int, default=8000)
    parser.add_argument("--num_val_scenes", type=int, default=256)
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    parser.add_argument("--seed", type=int, default=0)
    args = common.parse_args(parser)
    args.config = "demo"
    torch.set_grad_enabled(True)
    pipe = common.make_pipeline("demo")
    vae, scale_factor = pipe.vae, pipe.vae_scale_factor
    train_pixels, train_y = scenes("train", args.num_train_scenes, args.resolution)
    # validation scenes after the recipe's validation seeds
    val_pixels, val_y = scenes("val", args.num_val_scenes, args.resolution, first=2000)
    results = {}
    for kind in args.inputs:
        train_x, val_x = (probe_input(kind, vae, scale_factor, pixels) for pixels in (train_pixels, val_pixels))
        results[kind] = train_and_score(kind, vae.config.latent_channels, train_x, train_y, val_x, val_y, scale_factor,
                                        args.steps, args.batch_size, args.seed)
    names = list(next(iter(results.values()))["per_class"])
    rows = [[kind, r["mIoU"], *(r["per_class"][n] for n in names), round(r["train_seconds"])]
            for kind, r in results.items()]
    common.print_table(["input", "mIoU", *names, "train s"], rows,
                       f"{args.steps} steps, batch {args.batch_size}, {args.num_val_scenes} validation scenes, "
                       f"{torch.get_num_threads()} threads")
    common.write_results("demo_latent_probe", args, {"results": results}, results_dir=QUALITY_RESULTS_DIR)


if __name__ == "__main__":
    main()
