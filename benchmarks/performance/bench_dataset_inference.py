#!/usr/bin/env python
"""Dataset-inference throughput with 1, 2, ... processes: `digseg segment --input_dir` under `accelerate launch`.

    # this CPU (gloo), the demo model, 200 synthetic 64 px scenes:
    OMP_NUM_THREADS=1 python -m benchmarks.performance.bench_dataset_inference --processes 1 2 --num_images 200 \
        --output benchmarks/performance/results/dataset_inference_cpu.json
    # GPUs (one process per GPU), same script:
    python -m benchmarks.performance.bench_dataset_inference --device cuda --processes 1 2 4 8 --num_images 2000 \
        --batch_images 16 --batch_size 64 --output benchmarks/performance/results/dataset_inference_cuda.json

Each variant runs the real command line in fresh processes on the same images into a fresh --out, interleaved
(1 2 1 2 ...). Throughput is the run summary's: images / seconds of the slowest process's segmenting loop (model
loading and process start excluded); wall seconds with start-up are reported too, and the N / 1-process ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, machine_description, markdown_table

PROMPTS = ["circle", "square", "triangle", "star"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digseg-demo")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--size", type=int, default=64, help="Side of the synthetic scenes (pixels).")
    parser.add_argument("--batch_images", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per U-Net call (the CLI's --batch-size).")
    parser.add_argument("--format", choices=("png", "coco"), default="coco")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (CPU).")
    parser.add_argument("--work_dir", default=None, help="Where images and outputs go (default: a temporary folder).")
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--output", required=True, help="JSON file for the results.")
    return parser.parse_args()


def write_images(folder: str, count: int, size: int) -> None:
    from PIL import Image

    from digseg_diffusers.data.synthetic import generate_scene

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(generate_scene(10_000 + i, size=size).image).save(os.path.join(folder, f"scene{i:05d}.png"))


def run_once(args, processes: int, images: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = ["-m", "digseg_diffusers.inference.cli", "segment", "--input_dir", images, "--out", out,
               "--model", args.model, "--batch_images", str(args.batch_images), "--batch-size", str(args.batch_size),
               "--format", args.format, "--quiet", "--device", "cpu" if args.device == "cpu" else "auto",
               *sum((["-p", p] for p in PROMPTS), [])]
    python_path = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=python_path)
    if processes == 1:
        argv = [sys.executable, *command]
    else:
        if args.device == "cpu":
            env["ACCELERATE_USE_CPU"] = "1"
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(args.port), *command]  # fmt: skip
    start = time.perf_counter()
    completed = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{processes}-process run failed:\n{completed.stderr[-3000:]}")
    with open(os.path.join(out, "digseg_summary.json")) as handle:
        summary = json.load(handle)
    if summary["segmented"] != args.num_images:
        raise SystemExit(f"{processes}-process run segmented {summary['segmented']} of {args.num_images} images")
    return {"images_per_second": summary["images_per_second"], "wall_seconds": wall,
            "per_process_images_per_second": [p["images_per_second"] for p in summary["per_process"]]}  # fmt: skip


def main() -> None:
    args = parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="digseg_bench_dataset_")
    images = os.path.join(work, "images")
    if not os.path.isdir(images) or len(os.listdir(images)) != args.num_images:
        shutil.rmtree(images, ignore_errors=True)
        write_images(images, args.num_images, args.size)
    runs: dict[int, list[dict]] = {n: [] for n in args.processes}
    for repeat in range(args.repeats):
        for n in args.processes:  # interleaved
            result = run_once(args, n, images, os.path.join(work, f"out_{n}"))
            runs[n].append(result)
            print(f"repeat {repeat + 1}: {n} process(es): {result['images_per_second']:.2f} images/s "
                  f"({result['wall_seconds']:.1f} s wall)", flush=True)  # fmt: skip
    base = statistics.median(r["images_per_second"] for r in runs[args.processes[0]])
    rows, table = [], {}
    for n in args.processes:
        rate = statistics.median(r["images_per_second"] for r in runs[n])
        wall = statistics.median(r["wall_seconds"] for r in runs[n])
        table[n] = {"images_per_second": rate, "ratio_to_first": rate / base, "wall_seconds": wall, "runs": runs[n]}
        rows.append([n, rate, rate / base, wall])
    headers = ["processes", "images/s", f"ratio to {args.processes[0]} process(es)", "wall s (incl. start-up)"]
    print(markdown_table(headers, rows))
    arguments = {k: v for k, v in vars(args).items() if k not in ("work_dir", "output")}
    payload = {"benchmark": "dataset_inference", "args": arguments, "machine": machine_description(),
               "results": {str(n): v for n, v in table.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(payload, handle, indent=2)
    print(f"wrote {args.output}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
