"""Peak memory vs `batch_size`: the pipeline's chunking keeps memory bounded however many prompts are asked.

Every setting runs in a fresh process (an allocator keeps freed memory, so a second measurement in the same
process would read low): the pipeline is built, one call with K prompts runs, and the peak RSS above the RSS
before the call is recorded (CUDA: max allocated). Results never depend on `batch_size` (tests/test_pipeline).

    python -m benchmarks.performance.bench_memory --config tiny --resolution 256 --k 16 --batch_sizes 1 4 16
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import (
    PROMPTS,
    PeakMemory,
    base_parser,
    generators,
    make_pipeline,
    markdown_table,
    scene_image,
    setup,
    write_results,
)


def single(args) -> dict:
    pipe = make_pipeline(args.config, light_decoder=args.decoder == "light")
    image = scene_image(args.resolution)
    with PeakMemory() as peak:
        pipe(image, PROMPTS[: args.k], processing_resolution=0, batch_size=args.single, generator=generators(args.k),
             mask_decoder=args.decoder)
    return {"batch_size": args.single, "peak_rss_mb": peak.peak_rss_mb, "cuda_peak_mb": peak.cuda_peak_mb}


def main(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--decoder", choices=("vae", "light"), default="vae")
    parser.add_argument("--single", type=int, default=None, help="internal: measure one batch size in this process")
    args = parser.parse_args(argv)
    setup(args)
    if args.single is not None:
        print(json.dumps(single(args)))
        return
    results = []
    for batch_size in args.batch_sizes:
        command = [sys.executable, __file__, "--config", args.config, "--resolution", str(args.resolution),
                   "--k", str(args.k), "--decoder", args.decoder, "--single", str(batch_size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    table = markdown_table(["batch_size", "peak RSS above baseline MB", "CUDA max allocated MB"],
                           [[r["batch_size"], r["peak_rss_mb"], r["cuda_peak_mb"] or "-"] for r in results])
    print(f"{args.config} config, {args.resolution} px, K={args.k}, 1 step, {args.decoder} decoder")
    print(table)
    path = write_results(f"memory_{args.decoder}", args, {"results": results, "table": table})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
