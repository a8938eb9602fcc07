"""Cost of one training step of the demo recipe: U-Net layouts and attention-head widths, and the VAE encoding
that `train_adapter.py --cache_latents` saves.

One step = U-Net forward + backward + AdamW step on a batch of demo-sized inputs (``[z_x, z_t]`` at 16 x 16, 32
text tokens), the VAE cost = encoding the batch's images and masks. Variants are timed interleaved; the ratios to
the previous demo model's U-Net (cross-attention only at full resolution, 16 heads per level) are what to read.

    python benchmarks/bench_demo_training_step.py --threads 2
"""

from __future__ import annotations

import os
import sys

import torch
from common import ROOT, base_parser, interleaved, markdown_table, setup, write_results

from digseg_diffusers import DiGSegPipeline, mask_codec
from digseg_diffusers.demo import default_model_path

sys.path.insert(0, os.path.join(ROOT, "training"))
from train_demo_model import build_demo_unet  # noqa: E402

# (name, full-resolution attention, channels per head; None = 16 heads per level)
VARIANTS = [
    ("previous model: cross-only top level, 16 heads", "cross", None),
    ("SD2 layout, 16 heads", "full", None),
    ("cross-only top level, 16-channel heads", "cross", 16),
    ("SD2 layout, 16-channel heads (default)", "full", 16),
    ("SD2 layout, 32-channel heads", "full", 32),
]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    args.config = "demo"  # always the demo model's sizes (the name of the results file)
    setup(args)
    torch.set_grad_enabled(True)
    pipe = DiGSegPipeline.from_pretrained(default_model_path())
    vae = pipe.vae.eval()
    latent_channels = vae.config.latent_channels
    latent_size = args.resolution // pipe.vae_scale_factor
    batch = args.batch_size
    model_input = torch.randn(batch, 2 * latent_channels, latent_size, latent_size)
    timesteps = torch.full((batch,), 999)
    text_states = torch.randn(batch, 32, 64)
    target = torch.randn(batch, latent_channels, latent_size, latent_size)

    def training_step(unet, optimizer):
        def step():
            prediction = unet(model_input, timesteps, encoder_hidden_states=text_states, return_dict=False)[0]
            torch.nn.functional.mse_loss(prediction, target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps, parameters = {}, {}
    for name, layout, head_channels in VARIANTS:
        torch.manual_seed(0)
        unet = build_demo_unet(latent_channels, latent_size, attention_head_channels=head_channels, full_resolution_attention=layout)
        parameters[name] = sum(p.numel() for p in unet.parameters())
        steps[name] = training_step(unet, torch.optim.AdamW(unet.parameters(), lr=1e-4))

    pixels = torch.rand(batch, 3, args.resolution, args.resolution) * 2 - 1
    masks = (torch.rand(batch, 1, args.resolution, args.resolution) > 0.5).float()

    def encode():
        with torch.no_grad():
            mask_codec.encode_pixels(vae, pixels)
            mask_codec.encode_masks(vae, masks)

    steps["VAE: encode the batch's images + masks"] = encode
    timings = interleaved(steps, repeats=args.repeats)
    reference = timings[VARIANTS[0][0]]["median"]
    rows = [
        [name, f"{parameters[name]:,}" if name in parameters else "-", 1000 * t["median"], reference / t["median"]]
        for name, t in timings.items()
    ]
    print(f"batch {batch}, {args.resolution} px ({latent_size} x {latent_size} latents), {torch.get_num_threads()} threads")
    print(markdown_table(["variant", "parameters", "ms per step (median)", "speed vs previous model"], rows))
    path = write_results("demo_training_step", args, {"rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
