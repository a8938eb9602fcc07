"""Cost of one training step of the demo recipe: U-Net layouts and attention-head widths, and the VAE encoding
that `train_adapter.py --cache_latents` saves.

One step = `train_adapter.py`'s real step (`compute_training_loss`; `--loss` / `--prompts_per_image` choose the
objective) + backward + AdamW on a batch of demo-sized inputs (``[z_x, z_t]`` at 16 x 16, 32 text tokens); the VAE
cost = encoding the batch's images and masks. Variants are timed interleaved; read the ratios to the previous demo
model's U-Net (cross-attention only at full resolution, 16 heads per level).

    python -m benchmarks.performance.bench_demo_training_step --threads 2
    python -m benchmarks.performance.bench_demo_training_step --threads 2 --execution_variants [--compile]

`--execution_variants` times the default U-Net's step run other ways (bfloat16 autocast, channels-last, optionally
`torch.compile`) and prints the step's FLOPs and the rate reached: how close fp32 already is to what this CPU can do.
"""

from __future__ import annotations

import torch
from benchmarks import common
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

from digseg_diffusers import mask_codec
from digseg_diffusers.training.demo_recipe import DEMO_TIMESTEP_BIAS, build_demo_unet
from digseg_diffusers.training.step import LOSSES, TrainingLossConfig, compute_training_loss

# (name, full-resolution attention, channels per head; None = 16 heads per level)
VARIANTS = [
    ("previous model: cross-only top level, 16 heads", "cross", None),
    ("SD2 layout, 16 heads", "full", None),
    ("cross-only top level, 16-channel heads", "cross", 16),
    ("SD2 layout, 16-channel heads (default)", "full", 16),
    ("SD2 layout, 32-channel heads", "full", 32),
]


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--execution_variants", action="store_true",
                        help="Time bf16 autocast / channels-last (not layouts).")
    parser.add_argument("--compile", action="store_true",
                        help="With --execution_variants: also torch.compile (minutes).")
    parser.add_argument("--loss", choices=LOSSES, default="latent",
                        help="The objective timed (train_adapter.py --loss).")
    parser.add_argument("--prompts_per_image", type=int, default=1, help="train_adapter.py --prompts_per_image.")
    args = common.parse_args(parser)
    args.config = "demo"  # always the demo model's sizes (the name of the results file)
    torch.set_grad_enabled(True)
    pipe = common.make_pipeline("demo")
    vae = pipe.vae
    latent_channels = vae.config.latent_channels
    latent_size = args.resolution // pipe.vae_scale_factor
    batch = args.batch_size
    image_latents = torch.randn(batch, latent_channels, latent_size, latent_size)
    mask_latents = torch.randn(batch, latent_channels, latent_size, latent_size)
    text_states = torch.randn(batch, 32, 64)
    masks = (torch.rand(batch, 1, args.resolution, args.resolution) > 0.5).float()
    valid = torch.ones_like(masks)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # the demo recipe's objective (training/train_demo_model.py): timesteps biased to T - 1
    loss_config = TrainingLossConfig(loss=args.loss, prompts_per_image=args.prompts_per_image, **DEMO_TIMESTEP_BIAS)

    def training_step(unet, forward=None, channels_last=False, autocast=False):
        """train_adapter.py's step: `compute_training_loss` (noise, target, weighted loss), backward, AdamW."""
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        forward = unet if forward is None else forward
        latents = image_latents.contiguous(memory_format=torch.channels_last) if channels_last else image_latents
        generator = torch.Generator().manual_seed(0)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = compute_training_loss(
                    forward, scheduler, latents, mask_latents, text_states, masks, valid, loss_config,
                    generator=generator, vae=vae,
                )
            loss.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    if args.execution_variants:
        time_execution_variants(args, training_step, latent_channels, latent_size)
        return

    steps, parameters = {}, {}
    for name, layout, head_channels in VARIANTS:
        torch.manual_seed(0)
        unet = build_demo_unet(latent_channels, latent_size, attention_head_channels=head_channels,
                               full_resolution_attention=layout)
        parameters[name] = f"{sum(p.numel() for p in unet.parameters()):,}"
        steps[name] = training_step(unet)

    pixels = torch.rand(batch, 3, args.resolution, args.resolution) * 2 - 1
    masks = (torch.rand(batch, 1, args.resolution, args.resolution) > 0.5).float()

    def encode():
        with torch.no_grad():
            mask_codec.encode_pixels(vae, pixels)
            mask_codec.encode_masks(vae, masks)

    steps["VAE: encode the batch's images + masks"] = encode
    timings = common.interleaved(steps, repeats=args.repeats)
    reference = timings[VARIANTS[0][0]]["median"]
    rows = [[name, parameters.get(name, "-"), 1000 * t["median"], reference / t["median"]]
            for name, t in timings.items()]
    common.print_table(["variant", "parameters", "ms per step (median)", "speed vs previous model"], rows,
                       f"batch {batch}, {args.resolution} px ({latent_size} x {latent_size} latents), "
                       f"{torch.get_num_threads()} threads")
    common.write_results("demo_training_step", args, {"rows": rows})


def time_execution_variants(args, training_step, latent_channels: int, latent_size: int) -> None:
    """The default U-Net's step in fp32, bf16 autocast, channels-last (and compiled): same maths, other kernels."""

    def fresh_unet(channels_last=False):
        torch.manual_seed(0)
        unet = build_demo_unet(latent_channels, latent_size)
        return unet.to(memory_format=torch.channels_last) if channels_last else unet

    variants = {
        "fp32": training_step(fresh_unet()),
        "bf16 autocast": training_step(fresh_unet(), autocast=True),
        "fp32 channels-last": training_step(fresh_unet(channels_last=True), channels_last=True),
    }
    if args.compile:
        unet = fresh_unet()
        variants["fp32 torch.compile"] = training_step(unet, forward=torch.compile(unet))
        variants["fp32 torch.compile"]()  # compile outside the timed runs
    counter = FlopCounterMode(display=False)
    with counter:
        variants["fp32"]()
    flops = counter.get_total_flops()
    timings = common.interleaved(variants, repeats=args.repeats)
    reference = timings["fp32"]["median"]
    rows = [[name, 1000 * t["median"], flops / t["median"] / 1e9, reference / t["median"]]
            for name, t in timings.items()]
    common.print_table(["execution", "ms per step (median)", "GFLOP/s", "speed vs fp32"], rows,
                       f"batch {args.batch_size}, {latent_size} x {latent_size} latents, {torch.get_num_threads()} "
                       f"threads, {flops / 1e9:.1f} GFLOP per step (forward + backward, counted by torch)")
    common.write_results("demo_training_step_execution", args, {"gflop_per_step": flops / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
