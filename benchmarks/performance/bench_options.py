"""Performance options side by side: fp32 baseline vs channels_last, bfloat16, fused vs unfused LoRA, the light
decoder, VAE slicing, and (with --compile) `torch.compile` of the U-Net. Each variant is its own pipeline with
the same weights; times are interleaved; the max difference of the probability maps vs the baseline is shown.
On a CPU, bfloat16 is for correctness, not speed (few CPUs have fast bf16 kernels).

    python -m benchmarks.performance.bench_options --config tiny --resolution 128 --k 4 --compile
"""

from __future__ import annotations

import time

import numpy as np
import torch
from benchmarks import common

from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter


def with_lora(pipe, seed: int = 0):
    apply_adapter(pipe.unet, pipe.text_projection, DiGSegAdapterConfig(mode="lora", rank=8))
    torch.manual_seed(seed)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.02)
    pipe.unet.eval()
    return pipe


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the U-Net (can take minutes)")
    args = common.parse_args(parser, argv)
    image = common.scene_image(args.resolution)
    prompts = common.PROMPTS[: args.k]
    pipes = {"fp32 baseline": common.make_pipeline(args.config)}
    notes = {}

    pipe = common.make_pipeline(args.config)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipes["channels_last"] = pipe
    pipes["bfloat16"] = common.make_pipeline(args.config).to(torch.bfloat16)
    pipe = common.make_pipeline(args.config)
    pipe.vae.enable_slicing()
    pipes["VAE slicing"] = pipe
    pipes["light decoder (untrained, cost only)"] = common.make_pipeline(args.config, light_decoder=True)
    pipes["LoRA r8 unfused"] = with_lora(common.make_pipeline(args.config))
    fused = with_lora(common.make_pipeline(args.config))
    fused.fuse_lora()
    pipes["LoRA r8 fused"] = fused
    if args.compile:
        pipe = common.make_pipeline(args.config)
        pipe.unet = torch.compile(pipe.unet)
        start = time.perf_counter()
        try:
            pipe(image, prompts, processing_resolution=0, generator=common.generators(args.k))
            notes["compile_seconds"] = time.perf_counter() - start
            pipes["torch.compile(unet)"] = pipe
        except Exception as error:  # report, do not fail the other measurements
            notes["compile_error"] = f"{type(error).__name__}: {error}"[:500]
        print(notes, flush=True)

    def runner(p):
        return lambda: p(image, prompts, processing_resolution=0, generator=common.generators(args.k)).probabilities[0]

    reference = runner(pipes["fp32 baseline"])()
    diffs = {name: float(np.abs(runner(p)() - reference).max()) for name, p in pipes.items()}
    timing = common.interleaved({name: runner(p) for name, p in pipes.items()}, repeats=args.repeats)
    base = timing["fp32 baseline"]["median"]
    rows = [[name, timing[name]["median"], base / timing[name]["median"], diffs[name]] for name in pipes]
    table = common.print_table(["variant", "s / call", "speed vs fp32", "max |diff| vs fp32"], rows,
                               f"{args.config} config, {args.resolution} px, K={args.k}, 1 step")
    common.write_results("options", args, {"timing": timing, "max_abs_diff": diffs, "notes": notes, "table": table})


if __name__ == "__main__":
    main()
