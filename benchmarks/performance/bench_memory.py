"""Peak memory vs `batch_size`: the pipeline's chunking keeps memory bounded however many prompts are asked.

Every setting runs in a fresh process (an allocator keeps freed memory: a second measurement would read low);
one call with K prompts, its peak RSS above the RSS before it (CUDA: max allocated). Results never depend on
`batch_size` (tests/test_pipeline).

    python -m benchmarks.performance.bench_memory --config tiny --resolution 256 --k 16 --batch_sizes 1 4 16
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import common


def single(args) -> dict:
    pipe = common.make_pipeline(args.config, light_decoder=args.decoder == "light")
    image = common.scene_image(args.resolution)
    with common.PeakMemory() as peak:
        pipe(image, common.PROMPTS[: args.k], processing_resolution=0, batch_size=args.single,
             generator=common.generators(args.k), mask_decoder=args.decoder)
    return {"batch_size": args.single, "peak_rss_mb": peak.peak_rss_mb, "cuda_peak_mb": peak.cuda_peak_mb}


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--decoder", choices=("vae", "light"), default="vae")
    parser.add_argument("--single", type=int, default=None, help="internal: measure one batch size in this process")
    args = common.parse_args(parser, argv)
    if args.single is not None:
        print(json.dumps(single(args)))
        return
    results = []
    for batch_size in args.batch_sizes:
        command = [sys.executable, "-m", "benchmarks.performance.bench_memory", "--config", args.config, "--resolution",
                   str(args.resolution), "--k", str(args.k), "--decoder", args.decoder, "--single", str(batch_size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        child = subprocess.run(command, capture_output=True, text=True, cwd=common.ROOT)
        if child.returncode:
            raise SystemExit(f"batch_size {batch_size}: the measuring process failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    title = f"{args.config} config, {args.resolution} px, K={args.k}, 1 step, {args.decoder} decoder"
    table = common.print_table(["batch_size", "peak RSS above baseline MB", "CUDA max allocated MB"],
                               [[r["batch_size"], r["peak_rss_mb"], r["cuda_peak_mb"] or "-"] for r in results], title)
    common.write_results(f"memory_{args.decoder}", args, {"results": results, "table": table})


if __name__ == "__main__":
    main()
