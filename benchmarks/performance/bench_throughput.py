"""Images per second at 1x1 (one prompt per image, one step, E=1): each precision and memory-format variant,
each mask decoder, one or several images per call; timed interleaved. Made for a GPU (`--device cuda`); it runs
on the CPU too.

Before timing, every variant's probabilities are compared with the fp32 pipeline's (same weights and inputs), so a
fast variant that computes something else shows. `--offload_check` also compares `enable_model_cpu_offload()`'s
output and CUDA peak with the resident pipeline's.

    python -m benchmarks.performance.bench_throughput --config sd2 --resolution 512 --device cuda
    python -m benchmarks.performance.bench_throughput --config tiny --resolution 64 --variants fp32 bf16 --repeats 3
"""

from __future__ import annotations

import torch
from benchmarks import common

VARIANTS = ("fp32", "fp16", "bf16", "bf16+channels_last", "bf16+compile", "bf16+compile_ro", "bf16+cuda_graphs")
"""``compile``: `torch.compile` of the U-Net (default mode). ``compile_ro``: ``mode="reduce-overhead"`` (CUDA graphs
through inductor) of the U-Net and the light decoder. ``cuda_graphs``: U-Net, VAE encoder and light decoder
replayed from CUDA graphs without compiling (`common.CudaGraphed`). The graph variants capture one graph per
input shape: a call shape (images per call, processing size, prompts) is slow the first time only."""


def build_variant(name: str, args):
    """A pipeline for a variant name: a precision, optionally + channels_last or + compile (of the U-Net)."""
    precision, _, option = name.partition("+")
    pipe = common.make_pipeline(args.config, light_decoder=True, device=args.device, dtype=common.DTYPES[precision])
    if option == "channels_last":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    elif option == "compile":
        pipe.unet = torch.compile(pipe.unet)  # the U-Net only: compiling the SD VAE too took over 4 min on an H100
    elif option == "compile_ro":
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
        pipe.mask_decoder = torch.compile(pipe.mask_decoder, mode="reduce-overhead")
    elif option == "cuda_graphs":
        if not args.device.startswith("cuda"):
            raise SystemExit("the cuda_graphs variant needs --device cuda")
        pipe.unet = common.CudaGraphed(pipe.unet)
        pipe.vae.encoder = common.CudaGraphed(pipe.vae.encoder)
        pipe.mask_decoder = common.CudaGraphed(pipe.mask_decoder)
    elif option:
        raise SystemExit(f"unknown variant option {option!r} in {name!r}")
    return pipe


def segment(pipe, images, decoder: str):
    n = len(images)
    return pipe(images, "circle", num_inference_steps=1, ensemble_size=1, processing_resolution=0, batch_size=n,
                generator=common.generators(n), mask_decoder=decoder, output_type="pt").probabilities


def compare(probabilities, reference) -> dict:
    a = torch.stack([p.float() for p in probabilities])
    b = torch.stack([p.float() for p in reference])
    return {
        "finite": bool(torch.isfinite(a).all()),
        "max_abs_diff": float((a - b).abs().max()),
        "mean_abs_diff": float((a - b).abs().mean()),
        "mask_agreement_at_0.5": float(((a > 0.5) == (b > 0.5)).float().mean()),
    }


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "fp16", "bf16", "bf16+channels_last"],
                        help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--decoders", nargs="+", choices=("vae", "light"), default=["vae", "light"])
    parser.add_argument("--images_per_call", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--offload_check", action="store_true")
    args = common.parse_args(parser, argv)
    images = [common.scene_image(args.resolution, seed=i) for i in range(max(args.images_per_call))]
    check_images = images[:2]

    reference_pipe = common.make_pipeline(args.config, light_decoder=True, device=args.device, dtype=torch.float32)
    reference = {d: segment(reference_pipe, check_images, d) for d in args.decoders}
    del reference_pipe
    common.free_memory()

    rows, results = [], []
    for name in args.variants:
        pipe = build_variant(name, args)
        accuracy = {d: compare(segment(pipe, check_images, d), reference[d]) for d in args.decoders}
        calls = {(d, n): (lambda d=d, n=n: segment(pipe, images[:n], d))
                 for d in args.decoders for n in args.images_per_call}
        timing = common.interleaved({f"{d} x{n}": fn for (d, n), fn in calls.items()}, repeats=args.repeats)
        for (decoder, n), fn in calls.items():
            with common.PeakMemory() as peak:
                fn()
            seconds = timing[f"{decoder} x{n}"]["median"]
            acc = accuracy[decoder]
            rows.append([name, decoder, n, seconds * 1000, n / seconds, acc["max_abs_diff"],
                         acc["mask_agreement_at_0.5"], peak.cuda_peak_mb or "-"])
            results.append({"variant": name, "decoder": decoder, "images_per_call": n, "seconds": seconds,
                            "images_per_s": n / seconds, "accuracy_vs_fp32": acc,
                            "cuda_peak_mb": peak.cuda_peak_mb, "peak_rss_mb": peak.peak_rss_mb,
                            "times": timing[f"{decoder} x{n}"]["times"]})
            print(f"{name:>20} {decoder:>5} x{n:<3} {n / seconds:8.1f} images/s  (max |diff| vs fp32 "
                  f"{acc['max_abs_diff']:.2e})", flush=True)
        del pipe
        common.free_memory()

    offload = None
    if args.offload_check and args.device.startswith("cuda"):
        precision = common.DTYPES["bf16"]
        resident = common.make_pipeline(args.config, light_decoder=True, device=args.device, dtype=precision)
        with common.PeakMemory() as resident_peak:
            expected = segment(resident, check_images, "vae")
        del resident
        common.free_memory()
        offloaded = common.make_pipeline(args.config, light_decoder=True, device="cpu", dtype=precision)
        offloaded.enable_model_cpu_offload()
        with common.PeakMemory() as offload_peak:
            got = segment(offloaded, check_images, "vae")
        timing = common.interleaved({"offload": lambda: segment(offloaded, images[:1], "vae")}, repeats=args.repeats)
        offload = {"accuracy_vs_resident": compare(got, expected), "cuda_peak_mb_resident": resident_peak.cuda_peak_mb,
                   "cuda_peak_mb_offload": offload_peak.cuda_peak_mb,
                   "seconds_1_image": timing["offload"]["median"]}
        print(f"model CPU offload (bf16): max |diff| vs resident "
              f"{offload['accuracy_vs_resident']['max_abs_diff']:.2e}, "
              f"CUDA peak {offload_peak.cuda_peak_mb:.0f} MB vs {resident_peak.cuda_peak_mb:.0f} MB resident, "
              f"{1 / timing['offload']['median']:.2f} images/s")

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    title = f"\n{args.config} config, {args.resolution} px, 1x1, one prompt per image, {device_name}"
    table = common.print_table(["variant", "decoder", "images / call", "ms / call", "images/s", "max |diff| vs fp32",
                                "mask agreement vs fp32", "CUDA peak MB"], rows, title)
    common.write_results("throughput", args, {"results": results, "offload": offload, "table": table})


if __name__ == "__main__":
    main()
