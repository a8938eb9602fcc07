#!/usr/bin/env python
"""A/B of the training objectives on the synthetic world: latent, e2e, latent+e2e, each with and without the
argmax-aware multi-prompt loss, every arm fine-tuning the same model for the same steps on the same scenes.

    python -m benchmarks.quality.demo_loss_ab --work_dir runs/loss_ab --init_model digseg-demo --steps 200 --seeds 0 1

Each arm is one `training/train_demo_model.py --init_model ...` run (the recipe's own code path; interrupted arms
resume from their checkpoints, finished ones are skipped), then the recipe's threshold calibration and a 1 x 1
evaluation on held-out test scenes in the `plain` and the style-shifted rendering (`demo_fidelity.py`'s protocol).
Writes ``WORK_DIR/loss_ab.json`` and ``WORK_DIR/loss_ab.md``; the starting model is the first row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from benchmarks.common import ROOT, markdown_table
from benchmarks.quality.demo_fidelity import evaluate_settings, held_out_examples

from digseg_diffusers import DiGSegPipeline

DEFAULT_ARMS = ("latent:1", "latent:4", "e2e:1", "e2e:4", "latent+e2e:1", "latent+e2e:4")
EVAL_STYLES = ("plain", "shifted")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--init_model", default="digseg-demo")
    parser.add_argument("--arms", nargs="*", default=list(DEFAULT_ARMS),
                        help='"LOSS:K" pairs (K = prompts per image).')
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--batch_size", type=int, default=32, help="Queries per step in every arm (K x images).")
    parser.add_argument("--train_style", default="varied")
    parser.add_argument("--num_train_images", type=int, default=6000)
    parser.add_argument("--data_dir", default=None, help="Shared scenes (default: WORK_DIR/data).")
    parser.add_argument("--num_eval_scenes", type=int, default=100)
    parser.add_argument("--eval_only", action="store_true", help="Score finished arms only; train nothing.")
    return parser.parse_args(argv)


def arm_name(arm: str, seed: int) -> str:
    loss, prompts = arm.split(":")
    return f"{loss.replace('+', '_')}_k{prompts}_s{seed}"


def train_arm(args: argparse.Namespace, arm: str, seed: int, run_dir: Path) -> None:
    """Run one arm with the recipe script (nothing to do when it had finished before)."""
    if (run_dir / "demo_build_summary.json").is_file():
        return
    loss, prompts = arm.split(":")
    command = [
        sys.executable, str(Path(ROOT) / "training" / "train_demo_model.py"),
        "--work_dir", str(run_dir), "--init_model", args.init_model,
        "--data_dir", args.data_dir or str(Path(args.work_dir) / "data"),
        "--train_style", args.train_style, "--num_train_images", str(args.num_train_images),
        "--unet_steps", str(args.steps), "--learning_rate", str(args.learning_rate),
        "--lr_warmup_steps", str(max(1, args.steps // 10)), "--batch_size", str(args.batch_size),
        "--loss", loss, "--prompts_per_image", prompts,
        "--checkpointing_steps", str(max(1, args.steps // 4)), "--validation_steps", str(10 * args.steps),
        "--seed", str(seed),
    ]  # fmt: skip
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"arm {arm} seed {seed} failed (exit {result.returncode}); run again to resume it.")


def score(model: str, num_scenes: int) -> dict:
    pipe = DiGSegPipeline.from_pretrained(model)  # "digseg-demo" included
    pipe.set_progress_bar_config(disable=True)
    size = pipe.config.default_processing_resolution
    scores = {"mask_threshold": pipe.config.default_mask_threshold}
    for style in EVAL_STYLES:
        row = evaluate_settings(pipe, held_out_examples(num_scenes, size=size, style=style), [(1, 1)])[0]
        scores[style] = {key: row[key] for key in ("mIoU", "foreground_iou", "per_class_iou")}
    return scores


def write_table(path: Path, results: list[dict]) -> None:
    headers = ["arm", "seed", "train s", "tau", "mIoU test", "fg IoU test", "mIoU shifted", "fg IoU shifted",
               "per class test (circle square triangle star ring cross bg)"]
    rows = [[r["arm"], r["seed"], f"{r['train_s']:.0f}", str(r["mask_threshold"]),
             *(f"{r[style][key]:.3f}" for style in EVAL_STYLES for key in ("mIoU", "foreground_iou")),
             " ".join(f"{v:.2f}" for v in r["plain"]["per_class_iou"].values())] for r in results]
    path.write_text(markdown_table(headers, rows) + "\n")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "loss_ab.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {(r["arm"], r["seed"]) for r in results}
    if ("start", -1) not in done:
        results.insert(0, {"arm": "start", "seed": -1, "train_s": 0.0, **score(args.init_model, args.num_eval_scenes)})
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done:
                continue
            run_dir = work / arm_name(arm, seed)
            if args.eval_only and not (run_dir / "demo_build_summary.json").is_file():
                continue
            train_arm(args, arm, seed, run_dir)
            summary = json.loads((run_dir / "demo_build_summary.json").read_text())
            seconds = summary["timings"]["unet_s"]  # U-Net stage only (a resumed arm: its last part)
            scores = score(summary["pipeline"], args.num_eval_scenes)
            results.append({"arm": arm, "seed": seed, "train_s": seconds, **scores})
            results_file.write_text(json.dumps(results, indent=2) + "\n")
            write_table(work / "loss_ab.md", results)
            print(json.dumps(results[-1]), flush=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    write_table(work / "loss_ab.md", results)
    return results


if __name__ == "__main__":
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    main(sys.argv[1:])
