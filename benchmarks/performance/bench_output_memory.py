"""Peak memory of one call against the number of prompts K and the image size, by what the caller asks for.

What grows with K x H x W is the output at the input resolution. Modes: "all" (float32 probabilities + masks +
label map, the default), "labels" (label map only: computed prompt chunk by prompt chunk, so memory grows with
`batch_size`, not K), "uint8" (label map + uint8 probabilities). ``--before DIR`` also measures "all" with the
package of DIR (a checkout of an earlier commit). Each setting runs in a fresh process (an allocator keeps freed
memory); the tiny pipeline at processing resolution 64 keeps the model's own memory negligible.

    python -m benchmarks.performance.bench_output_memory --sizes 0.25 3 12 --ks 1 16 150 --before /old/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# The repository: on the children's path, so that they find `benchmarks` (after a --before checkout's package).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES_MP = {0.25: (512, 512), 3: (1500, 2000), 12: (3000, 4000)}
MODES = {
    "all": {},
    "labels": {"output_probabilities": False, "output_masks": False},
    "uint8": {"output_masks": False, "probability_dtype": "uint8"},
}


def measure(size_mp: float, k: int, mode: str) -> dict:
    """One call in this process (the child side)."""
    import numpy as np
    import torch
    from benchmarks.common import PeakMemory

    from digseg_diffusers.testing_utils import make_tiny_pipeline
    from digseg_diffusers.vocabularies import load_vocabulary

    torch.set_grad_enabled(False)
    pipe = make_tiny_pipeline(seed=0)
    prompts = list(load_vocabulary("ade20k-150").class_names)[:k]
    height, width = SIZES_MP[size_mp]
    image = np.random.RandomState(0).randint(0, 256, (height, width, 3), dtype=np.uint8)
    pipe(image[:64, :64], prompts[:1], processing_resolution=64)  # warm-up: lazy initialisation is not output
    with PeakMemory() as peak:
        out = pipe(image, prompts, processing_resolution=64, batch_size=8, generator=torch.Generator().manual_seed(0),
                   **MODES[mode])
        assert out.label_maps[0].shape == (height, width)
    return {"size_mp": size_mp, "k": k, "mode": mode, "peak_rss_mb": peak.peak_rss_mb}


def run_child(size_mp: float, k: int, mode: str, code_root: str | None) -> dict:
    roots = [os.path.abspath(code_root), ROOT] if code_root else [ROOT]  # that checkout's package first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(roots))
    command = [sys.executable, __file__, "--single", str(size_mp), str(k), mode]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        return {"size_mp": size_mp, "k": k, "mode": mode, "error": completed.stderr.strip().splitlines()[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=sorted(SIZES_MP), choices=sorted(SIZES_MP))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 16, 150])
    parser.add_argument("--before", default=None, help="a checkout whose digseg_diffusers is measured as 'before'")
    parser.add_argument("--single", nargs=3, default=None, help="internal: SIZE K MODE measured in this process")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    if args.single:
        size, k, mode = args.single
        print(json.dumps(measure(float(size), int(k), mode)))
        return

    from benchmarks.common import RESULTS_DIR, machine_description, print_table

    results = []
    columns = (["before"] if args.before else []) + list(MODES)
    for size in args.sizes:
        for k in args.ks:
            row = {"size_mp": size, "k": k}
            if args.before:
                row["before"] = run_child(size, k, "all", args.before)
            for mode in MODES:
                row[mode] = run_child(size, k, mode, None)
            results.append(row)
            print(json.dumps(row), flush=True)

    rows = []
    for row in results:
        all_mb, labels_mb = row["all"].get("peak_rss_mb"), row["labels"].get("peak_rss_mb")
        ratio = f"{labels_mb / all_mb:.3f}" if all_mb and labels_mb is not None else "-"
        cells = [row[c].get("peak_rss_mb", row[c].get("error", "?")) for c in columns]
        rows.append([row["size_mp"], row["k"], *cells, ratio])
    table = print_table(["image MP", "K"] + [f"{c} MB" for c in columns] + ["labels / all"], rows)
    path = args.output or os.path.join(RESULTS_DIR, "output_memory_tiny.json")
    with open(path, "w") as f:
        json.dump({"benchmark": "output_memory", "machine": machine_description(), "results": results,
                   "table": table}, f, indent=2, default=float)
    print(f"results: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
