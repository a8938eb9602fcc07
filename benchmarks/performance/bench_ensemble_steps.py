"""Ensemble size x denoising steps, like the paper's Table 6 (E x S: 1x1, 1x2, 4x2, 8x2, 20x50 "w/o trailing").

One image, one prompt per call (the paper's FPS is per class query); "20x50 w/o trailing" uses DDIM's
`timestep_spacing="leading"`. Timed interleaved; the table gives images/s and the speed relative to 1x1 next to
the paper's (its GPU FPS / its 1x1 FPS), and the FLOPs per image.

    python -m benchmarks.performance.bench_ensemble_steps --config tiny --resolution 64
    python -m benchmarks.performance.bench_ensemble_steps --config sd2 --resolution 128 --repeats 2 --skip_long
"""

from __future__ import annotations

from benchmarks import common
from diffusers import DDIMScheduler

PAPER_FPS = {"1x1": 11.27, "1x2": 10.61, "4x2": 5.82, "8x2": 3.15, "20x50 leading": 0.12}
SETTINGS = [(1, 1, "trailing"), (1, 2, "trailing"), (4, 2, "trailing"), (8, 2, "trailing"), (20, 50, "leading")]


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--skip_long", action="store_true", help="leave out 20x50 (1000 U-Net rows per image)")
    parser.add_argument("--batch_size", type=int, default=20)
    parser.add_argument("--prompt", default="circle")
    args = common.parse_args(parser, argv)
    pipe = common.make_pipeline(args.config, device=args.device, dtype=args.torch_dtype)
    image = common.scene_image(args.resolution)
    trailing = pipe.scheduler
    leading = DDIMScheduler.from_config(trailing.config, timestep_spacing="leading")
    flops = common.component_flops(pipe, args.resolution)

    settings = [s for s in SETTINGS if not (args.skip_long and s[1] == 50)]
    variants = {}
    for ensemble, steps, spacing in settings:
        name = f"{ensemble}x{steps}" + (" leading" if spacing == "leading" else "")

        def run(ensemble=ensemble, steps=steps, scheduler=trailing if spacing == "trailing" else leading):
            pipe.scheduler = scheduler
            try:
                return pipe(image, args.prompt, num_inference_steps=steps, ensemble_size=ensemble,
                            processing_resolution=0, batch_size=args.batch_size, generator=common.generators(ensemble))
            finally:
                pipe.scheduler = trailing

        variants[name] = run
    timing = common.interleaved(variants, repeats=args.repeats)
    peaks = common.peak_memory(variants)
    base = timing["1x1"]["median"]
    rows, results = [], []
    for (ensemble, steps, _), name in zip(settings, variants):
        seconds, peak = timing[name]["median"], peaks[name]
        image_flops = flops["encode"] + ensemble * steps * flops["unet"] + flops["decode_vae"]
        paper_relative = PAPER_FPS[name] / PAPER_FPS["1x1"]
        rows.append([name, seconds, 1.0 / seconds, base / seconds, paper_relative, image_flops / 1e9,
                     peak.peak_rss_mb, peak.cuda_peak_mb or "-"])
        results.append({"setting": name, "seconds": seconds, "images_per_s": 1.0 / seconds,
                        "relative_to_1x1": base / seconds, "paper_relative": paper_relative,
                        "gflop_per_image": image_flops / 1e9, "peak_rss_mb": peak.peak_rss_mb,
                        "cuda_peak_mb": peak.cuda_peak_mb, "times": timing[name]["times"]})
    table = common.print_table(["E x S", "s / image", "images/s", "relative to 1x1", "paper relative (GPU)",
                                "GFLOP / image", "peak RSS MB", "CUDA peak MB"], rows,
                               f"{args.config} config, {args.resolution} px, K=1, {args.device} {args.dtype}")
    common.write_results("ensemble_steps", args, {"flops": flops, "results": results, "table": table})


if __name__ == "__main__":
    main()
