"""Batched K prompts (one pipeline call) vs the paper's per-class loop (one call per prompt), side by side.

For each K the outputs of both are checked equal (`OUTPUT_TOLERANCE`: 1e-4 in fp32, more in fp16/bf16; rows
batched differently sum in another order), then the two (and the batched call with the light mask decoder, when
asked) are timed interleaved. The FLOP model predicts the speed-up: loop = K (E + U + D), batched = E + K (U + D),
light = E + K (U + L).

    python -m benchmarks.performance.bench_batched_prompts --config tiny --resolution 64 --ks 1 4 8 16
    python -m benchmarks.performance.bench_batched_prompts --config sd2 --resolution 128 --ks 2 --repeats 2
"""

from __future__ import annotations

import numpy as np
from benchmarks import common


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--no_light", action="store_true", help="skip the light-decoder variant")
    args = common.parse_args(parser, argv)
    pipe = common.make_pipeline(args.config, light_decoder=not args.no_light, device=args.device,
                                dtype=args.torch_dtype)
    image = common.scene_image(args.resolution)
    call_options = dict(processing_resolution=0, num_inference_steps=1, batch_size=args.batch_size)
    flops = common.component_flops(pipe, args.resolution)
    e, u, d = flops["encode"], flops["unet"], flops["decode_vae"]

    rows, results = [], []
    for k in args.ks:
        prompts = common.PROMPTS[:k]

        def batched(decoder="vae"):
            return pipe(image, prompts, generator=common.generators(k), mask_decoder=decoder, **call_options)

        def loop():
            return [pipe(image, p, generator=common.generators(1, seed=i), mask_decoder="vae", **call_options)
                    for i, p in enumerate(prompts)]

        a = batched().probabilities[0]
        b = np.concatenate([out.probabilities[0] for out in loop()])
        max_diff = float(np.abs(a - b).max())
        if max_diff > common.OUTPUT_TOLERANCE[args.torch_dtype]:
            raise AssertionError(f"K={k}: batched and per-class outputs differ by {max_diff}")
        variants = {"loop": loop, "batched": batched}
        if not args.no_light:
            variants["batched_light"] = lambda: batched("light")
        timing = common.interleaved(variants, repeats=args.repeats)
        memory = {name: peak.peak_rss_mb if peak.cuda_peak_mb is None else peak.cuda_peak_mb
                  for name, peak in common.peak_memory(variants).items()}
        predicted = k * (e + u + d) / (e + k * (u + d))
        speedup = timing["loop"]["median"] / timing["batched"]["median"]
        row = [k, timing["loop"]["median"], timing["batched"]["median"], speedup, predicted, max_diff,
               memory["loop"], memory["batched"]]
        result = {"k": k, "timing": timing, "peak_rss_mb": memory, "max_abs_diff": max_diff,
                  "speedup_batched": speedup, "predicted_speedup_batched": predicted}
        if not args.no_light:
            light_speedup = timing["loop"]["median"] / timing["batched_light"]["median"]
            light_predicted = k * (e + u + d) / (e + k * (u + flops["decode_light"]))
            row += [timing["batched_light"]["median"], light_speedup, light_predicted, memory["batched_light"]]
            result.update(speedup_batched_light=light_speedup, predicted_speedup_batched_light=light_predicted)
        rows.append(row)
        results.append(result)
        print(f"K={k}: loop {timing['loop']['median']:.3f}s batched {timing['batched']['median']:.3f}s "
              f"speed-up {speedup:.2f}x (FLOP model {predicted:.2f}x), max diff {max_diff:.1e}", flush=True)

    headers = ["K", "loop s", "batched s", "speed-up", "FLOP-predicted", "max |diff|", "loop peak MB",
               "batched peak MB"]
    if not args.no_light:
        headers += ["batched+light s", "light speed-up", "light FLOP-predicted", "light peak MB"]
    light = f", light decode {flops['decode_light']:.3g}" if "decode_light" in flops else ""
    title = (f"\n{args.config} config, {args.resolution} px, {args.device} {args.dtype}, 1 step, E=1; FLOPs/forward: "
             f"encode {e:.3g}, U-Net {u:.3g}, VAE decode {d:.3g}{light}")
    table = common.print_table(headers, rows, title)
    common.write_results("batched_prompts", args, {"flops": flops, "results": results, "table": table})


if __name__ == "__main__":
    main()
