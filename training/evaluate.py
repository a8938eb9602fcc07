#!/usr/bin/env python
"""Evaluate a DiGSeg pipeline on a dataset split: mIoU and friends, per setting of ensemble size x steps.

    accelerate launch training/evaluate.py --pipeline path/or/hub-id [--adapter path/or/hub-id] \
        --dataset_format ade20k --dataset_root /data/ADEChallengeData2016 --split validation \
        --settings 1x1 4x2 --output_dir eval-ade20k

Protocols:
- closed vocabulary (default): every dataset class is a prompt of every image;
- open vocabulary (``--proposer PATH``, or ``--proposer pipeline`` for the proposer saved with the pipeline): a CLIP
  class proposer picks each image's candidate classes and only those are segmented; pixels of classes that were
  not proposed count as misses.

Distributed: each process takes the examples whose index modulo the number of processes is its rank; the count
tensors are summed with ``accelerator.reduce``. Every ``--checkpoint_every`` images each process saves its
shard's counts under ``OUTPUT/partial/``; ``--resume`` continues from there (with the same number of processes).
Writes ``evaluation.json`` (``card_metrics`` feeds ``digseg_diffusers.hub.card_metadata``), ``evaluation.md`` and
PNG plots. The metric logic lives in ``digseg_diffusers.evaluation``; this script parses arguments, runs the loop
and draws the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from digseg_diffusers.data.readers import BACKGROUND_INDEX, READERS, build_reader, read_class_names_file
from digseg_diffusers.evaluation import (
    DEFAULT_CURVE_THRESHOLDS,
    EvaluationAccumulator,
    EvaluationSetting,
    card_metrics,
    evaluate_example,
    load_partial,
    save_partial,
)
from digseg_diffusers.metrics import to_jsonable

logger = logging.getLogger("digseg.evaluate")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS_NAME = "evaluation.json"
REPORT_NAME = "evaluation.md"
CURVE_PLOT_NAME = "iou_vs_threshold.png"
PARTIAL_DIR = "partial"
PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a DiGSeg pipeline on a segmentation dataset split.")
    model = parser.add_argument_group("model")
    model.add_argument("--pipeline", required=True, help="DiGSeg pipeline folder or Hub id.")
    model.add_argument("--adapter", default=None, help="DiGSeg adapter (folder or Hub id) loaded onto the pipeline.")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    model.add_argument(
        "--proposer",
        default=None,
        help="Open-vocabulary protocol: a saved DiGSegClassProposer or CLIP checkpoint (folder or Hub id), or "
        "'pipeline' for the proposer saved with the pipeline. Without it: closed vocabulary.",
    )
    model.add_argument("--proposer_global_threshold", type=float, default=None)
    model.add_argument("--proposer_patch_threshold", type=float, default=None, help="Negative disables patches.")
    model.add_argument("--proposer_top_k", type=int, default=None)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_format", choices=sorted(READERS), default="folder")
    data.add_argument("--dataset_root", required=True)
    data.add_argument("--split", default="val", help="Split name (e.g. val, validation, val2017).")
    names = data.add_mutually_exclusive_group()
    names.add_argument("--class_names_file", default=None, help="Class names to prompt with, one per line.")
    names.add_argument("--vocabulary", default=None, help="Bundled vocabulary whose names to prompt with.")
    data.add_argument("--max_images", type=int, default=None, help="Evaluate only the first N images.")
    data.add_argument("--dataset_name", default=None, help="Dataset name for the model card (default: the format).")

    run = parser.add_argument_group("inference")
    run.add_argument("--settings", nargs="+", default=["1x1"], help="ENSEMBLExSTEPS settings, e.g. 1x1 4x2.")
    run.add_argument("--processing_resolution", type=int, default=None, help="Default: the pipeline's config.")
    run.add_argument("--mask_threshold", type=float, default=None)
    run.add_argument("--background_threshold", type=float, default=None)
    run.add_argument("--batch_size", type=int, default=8, help="Rows per U-Net call (never changes results).")
    run.add_argument("--seed", type=int, default=0, help="Example i uses a generator seeded with seed + i.")
    run.add_argument("--curve_thresholds", type=float, nargs="+", default=list(DEFAULT_CURVE_THRESHOLDS))

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True)
    out.add_argument("--checkpoint_every", type=int, default=50, help="Save each shard's counts every N images.")
    out.add_argument("--resume", action="store_true", help="Continue from the partial counts in --output_dir.")
    out.add_argument("--overwrite", action="store_true", help="Discard earlier results in --output_dir.")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint_every must be >= 1, got {args.checkpoint_every}")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max_images must be >= 1, got {args.max_images}")
    try:
        args.parsed_settings = list(dict.fromkeys(EvaluationSetting.parse(s) for s in args.settings))
    except ValueError as error:
        parser.error(f"--settings: {error}")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def build_dataset_reader(args):
    class_names = None
    if args.class_names_file:
        class_names = read_class_names_file(args.class_names_file)
    elif args.vocabulary:
        from digseg_diffusers.vocabularies import load_vocabulary

        class_names = list(load_vocabulary(args.vocabulary).class_names)
    return build_reader(args.dataset_format, args.dataset_root, args.split, class_names=class_names)


def load_pipeline(args, device: torch.device):
    from digseg_diffusers import DiGSegPipeline

    # The saved proposer is loaded only when asked for, so a closed-vocabulary run never loads CLIP.
    extra = {} if args.proposer == "pipeline" else {"class_proposer": None}
    if args.dtype != "float32":
        extra["torch_dtype"] = DTYPES[args.dtype]
    pipe = DiGSegPipeline.from_pretrained(args.pipeline, **extra)
    if args.adapter:
        pipe.load_digseg_adapter(args.adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_proposer(args, pipe, device: torch.device):
    if args.proposer is None:
        return None
    overrides = {
        "global_threshold": args.proposer_global_threshold,
        "patch_threshold": args.proposer_patch_threshold,
        "top_k": args.proposer_top_k,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("patch_threshold", 0) < 0:
        overrides["patch_threshold"] = None
    if args.proposer == "pipeline":
        proposer = pipe.class_proposer
        if proposer is None:
            raise ValueError(f"--proposer pipeline: {args.pipeline} has no saved class proposer (class_proposer/).")
        for key, value in overrides.items():
            setattr(proposer, key, value)
    else:
        from digseg_diffusers.proposal import DiGSegClassProposer

        proposer = DiGSegClassProposer.from_pretrained(args.proposer, **overrides)
    return proposer.to(device)


def fingerprint(args, reader, num_examples: int, num_processes: int, proposer) -> dict:
    """What the partial counts depend on; a resumed run must match it exactly."""
    return {
        "pipeline": str(args.pipeline),
        "adapter": args.adapter,
        "dtype": args.dtype,
        "dataset_format": args.dataset_format,
        "dataset_root": os.path.abspath(args.dataset_root),
        "split": args.split,
        "class_names": list(reader.class_names),
        "num_examples": num_examples,
        "settings": [s.name for s in args.parsed_settings],
        "proposer": args.proposer,
        "proposer_config": proposer.proposer_config() if hasattr(proposer, "proposer_config") else None,
        "processing_resolution": args.processing_resolution,
        "mask_threshold": args.mask_threshold,
        "background_threshold": args.background_threshold,
        "seed": args.seed,
        "curve_thresholds": list(args.curve_thresholds),
        "num_processes": num_processes,
    }


def prepare_output_dir(args, accelerator: Accelerator) -> str:
    partial_dir = os.path.join(args.output_dir, PARTIAL_DIR)
    if accelerator.is_main_process:
        earlier = os.path.isdir(partial_dir) or os.path.isfile(os.path.join(args.output_dir, RESULTS_NAME))
        if earlier and not (args.resume or args.overwrite):
            raise FileExistsError(
                f"{args.output_dir} holds an earlier evaluation; pass --resume to continue it or --overwrite to "
                "start again."
            )
        if args.overwrite:
            shutil.rmtree(partial_dir, ignore_errors=True)
            for old in Path(args.output_dir).glob("*"):
                if old.name in (RESULTS_NAME, REPORT_NAME, CURVE_PLOT_NAME) or old.name.startswith("per_class_iou_"):
                    old.unlink()
        os.makedirs(partial_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    return partial_dir


# --------------------------------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes

    reader = build_dataset_reader(args)
    num_examples = len(reader) if args.max_images is None else min(args.max_images, len(reader))
    partial_dir = prepare_output_dir(args, accelerator)
    pipe = load_pipeline(args, accelerator.device)
    proposer = load_proposer(args, pipe, accelerator.device)
    include_background = BACKGROUND_INDEX in reader.label_mapping.values()
    pipeline_kwargs = {
        "processing_resolution": args.processing_resolution,
        "mask_threshold": args.mask_threshold,
        "background_threshold": args.background_threshold,
        "batch_size": args.batch_size,
    }

    def new_accumulators() -> dict:
        return {
            setting: EvaluationAccumulator(
                reader.class_names, reader.ignore_index, include_background, args.curve_thresholds
            )
            for setting in args.parsed_settings
        }

    accumulators = new_accumulators()
    shard = list(range(rank, num_examples, world))
    shard_file = os.path.join(partial_dir, f"shard-{rank:03d}-of-{world:03d}.pt")
    run_fingerprint = fingerprint(args, reader, num_examples, world, proposer)
    if args.resume:
        other_runs = sorted(
            name
            for name in os.listdir(partial_dir)
            if name.startswith("shard-") and not name.endswith(f"-of-{world:03d}.pt")
        )
        if other_runs:
            raise ValueError(
                f"--resume: {partial_dir} holds shards of a run with another number of processes ({other_runs[0]}); "
                f"resume with that number of processes ({world} now), or use --overwrite."
            )
    start = load_partial(shard_file, accumulators, run_fingerprint) if args.resume else 0
    if start:
        logger.info(f"process {rank}: resuming after {start} of its {len(shard)} images")
    accelerator.wait_for_everyone()

    if start < len(shard):  # one untimed call first, so that one-off start-up costs stay out of seconds_per_image
        warmup = reader.load_validation_example(shard[start])
        pipe(warmup.image, prompt=reader.class_names[:1], num_inference_steps=1, **pipeline_kwargs)

    progress = tqdm(
        total=len(shard), initial=start, disable=not accelerator.is_local_main_process, desc="evaluating", unit="img"
    )
    for position in range(start, len(shard)):
        index = shard[position]
        example = reader.load_validation_example(index)
        evaluate_example(
            pipe, example, index, accumulators, reader.class_names, proposer=proposer, seed=args.seed, **pipeline_kwargs
        )
        progress.update()
        if (position + 1) % args.checkpoint_every == 0 or position + 1 == len(shard):
            save_partial(shard_file, position + 1, accumulators, run_fingerprint)
    progress.close()
    if start == len(shard):  # nothing left: still write the file a fresh run would have written
        save_partial(shard_file, start, accumulators, run_fingerprint)

    # Sum every process's counts.
    accelerator.wait_for_everyone()
    totals = new_accumulators()
    for setting, accumulator in accumulators.items():
        state = {
            key: accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()
            for key, tensor in accumulator.state_dict().items()
        }
        totals[setting].load_state_dict(state)
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None

    results = build_results(args, reader, totals, num_examples, world, include_background, proposer)
    results["inference"] = effective_inference_settings(args, pipe)
    write_outputs(results, args.output_dir)
    logger.info(f"wrote {os.path.join(args.output_dir, RESULTS_NAME)} and {REPORT_NAME}")
    accelerator.end_training()
    return results


def effective_inference_settings(args, pipe) -> dict:
    """The values the pipeline actually used (arguments, else the pipeline's defaults)."""
    resolved = pipe.resolve_call_defaults(
        processing_resolution=args.processing_resolution,
        mask_threshold=args.mask_threshold,
        background_threshold=args.background_threshold,
    )
    return {
        "processing_resolution": resolved["processing_resolution"],
        "mask_threshold": resolved["mask_threshold"],
        "background_threshold": resolved["background_threshold"],
        "dtype": args.dtype,
        "seed": args.seed,
    }


def build_results(
    args, reader, totals: dict, num_examples: int, world: int, include_background: bool, proposer
) -> dict:
    settings = {
        setting.name: {
            "ensemble_size": setting.ensemble_size,
            "num_inference_steps": setting.num_inference_steps,
            **accumulator.compute(),
        }
        for setting, accumulator in totals.items()
    }
    if proposer is None:
        for values in settings.values():
            values.pop("proposal")
    primary = next(iter(settings))
    proposer_settings = proposer.proposer_config() if hasattr(proposer, "proposer_config") else {}
    return to_jsonable(
        {
            "pipeline": str(args.pipeline),
            "adapter": args.adapter,
            "protocol": "open-vocabulary" if proposer is not None else "closed-vocabulary",
            "proposer": None if proposer is None else {"source": args.proposer, **proposer_settings},
            "dataset": {
                "name": args.dataset_name or args.dataset_format,
                "format": args.dataset_format,
                "root": str(args.dataset_root),
                "split": args.split,
                "num_images": num_examples,
                "class_names": list(reader.class_names),
                "ignore_index": reader.ignore_index,
                "background_class": include_background,
            },
            "inference": {},  # filled by `effective_inference_settings`
            "num_processes": world,
            "primary_setting": primary,
            "card_metrics": card_metrics(settings[primary]),
            "settings": settings,
        }
    )


# --------------------------------------------------------------------------------------------------------------------
# Report: JSON, markdown and PNG plots (PIL only; no matplotlib dependency)
# --------------------------------------------------------------------------------------------------------------------


def write_outputs(results: dict, output_dir: str) -> dict[str, str]:
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, RESULTS_NAME), "markdown": os.path.join(output_dir, REPORT_NAME)}
    paths["iou_vs_threshold"] = os.path.join(output_dir, CURVE_PLOT_NAME)
    plot_iou_vs_threshold(results, paths["iou_vs_threshold"])
    for name, values in results["settings"].items():
        paths[f"per_class_iou_{name}"] = os.path.join(output_dir, f"per_class_iou_{name}.png")
        plot_per_class_iou(values, paths[f"per_class_iou_{name}"], title=f"Per-class IoU, setting {name}")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    Path(paths["markdown"]).write_text(markdown_report(results), encoding="utf-8")
    return paths


def _pct(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}"


def markdown_report(results: dict) -> str:
    dataset = results["dataset"]
    settings = results["settings"]
    inference = results["inference"]
    background = " + background scored as a class" if dataset["background_class"] else ""
    if results["protocol"] == "open-vocabulary":
        protocol = f"open vocabulary: the class proposer `{results['proposer']['source']}` picks each image's classes"
    else:
        protocol = "closed vocabulary: every dataset class is a prompt of every image"
    adapter = f" + adapter `{results['adapter']}`" if results["adapter"] else ""
    lines = [
        "# DiGSeg evaluation",
        "",
        f"- pipeline: `{results['pipeline']}`{adapter}",
        f"- dataset: `{dataset['name']}` ({dataset['format']} reader), split `{dataset['split']}`, "
        f"{dataset['num_images']} images, {len(dataset['class_names'])} classes{background}",
        f"- protocol: {protocol}",
        f"- processing resolution {inference['processing_resolution'] or 'native'}, mask threshold "
        f"{inference['mask_threshold']}, background threshold {inference['background_threshold']}, dtype "
        f"{inference['dtype']}, seed {inference['seed']}, {results['num_processes']} process(es)",
        "",
        "## Summary (%)",
        "",
        "| setting (E x S) | mIoU | pixel acc. | mean acc. | mean Dice | best threshold (mean IoU) | s / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in settings.items():
        curve = s["iou_vs_threshold"]
        best = "n/a"
        if curve["best_threshold"] is not None:
            best = f"{curve['best_threshold']:.2f} ({_pct(curve['best_mean_iou'])})"
        seconds = "n/a" if s["seconds_per_image"] is None else f"{s['seconds_per_image']:.3f}"
        lines.append(
            f"| {name} | {_pct(s['mIoU'])} | {_pct(s['pixel_accuracy'])} | {_pct(s['mean_accuracy'])} | "
            f"{_pct(s['mean_dice'])} | {best} | {seconds} |"
        )
    first = next(iter(settings.values()))
    if "binary" in first:
        lines += ["", "## Binary scores (%)", "", "| setting | IoU | precision | recall | F1 | Dice |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for name, s in settings.items():
            b = s["binary"]
            scores = " | ".join(_pct(b[key]) for key in ("iou", "precision", "recall", "f1", "dice"))
            lines.append(f"| {name} | {scores} |")
    if "proposal" in first:
        p = first["proposal"]
        lines += [
            "",
            "## Class proposal",
            "",
            f"{p['mean_classes_per_image']:.2f} classes proposed per image; recall {_pct(p['recall'])} % of the "
            f"classes present, precision {_pct(p['precision'])} %; {p['images_without_proposal']} image(s) without a "
            "proposal (predicted as background).",
        ]
    names = list(first["per_class"])
    lines += ["", "## Per-class IoU (%)", "", "| class | pixels | " + " | ".join(settings) + " |"]
    lines.append("| --- | --- | " + " | ".join("---" for _ in settings) + " |")
    for class_name in names:
        row = [_pct(s["per_class"][class_name]["iou"]) for s in settings.values()]
        lines.append(f"| {class_name} | {first['per_class'][class_name]['pixels']} | " + " | ".join(row) + " |")
    lines += ["", "## Plots", "", f"![IoU against the mask threshold]({CURVE_PLOT_NAME})", ""]
    lines += [f"![Per-class IoU, setting {name}](per_class_iou_{name}.png)" for name in settings]
    lines += [
        "",
        "n/a: undefined (the class appears neither in the ground truth nor in the prediction); left out of the means.",
        "",
    ]
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def plot_iou_vs_threshold(results: dict, path: str, size: tuple[int, int] = (640, 420)) -> None:
    """Mean IoU (over classes) of ``probability > t`` masks against t, one line per setting."""
    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)

    def xy(t: float, iou: float) -> tuple[float, float]:
        return left + t * (width - left - right), top + (1.0 - iou) * (height - top - bottom)

    for i in range(6):  # grid and ticks at 0, 0.2, ..., 1
        v = i / 5
        x, _ = xy(v, 0)
        _, y = xy(0, v)
        draw.line([xy(0, v), xy(1, v)], fill=(225, 225, 225))
        draw.line([xy(v, 0), xy(v, 1)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{v:.1f}", fill="black", font=small, anchor="rm")
        draw.text((x, height - bottom + 8), f"{v:.1f}", fill="black", font=small, anchor="mt")
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.text((width / 2, height - 14), "mask threshold t", fill="black", font=font, anchor="mm")
    draw.text((12, top - 22), "mean IoU", fill="black", font=font, anchor="lm")
    draw.text((width / 2, 14), "IoU of (probability > t) against t", fill="black", font=font, anchor="mm")
    for k, (name, values) in enumerate(results["settings"].items()):
        color = PLOT_COLORS[k % len(PLOT_COLORS)]
        curve = values["iou_vs_threshold"]
        points = [xy(t, v) for t, v in zip(curve["thresholds"], curve["mean_iou"]) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 12 + 18 * k
        draw.line([(width - right - 110, legend_y), (width - right - 85, legend_y)], fill=color, width=3)
        draw.text((width - right - 78, legend_y), name, fill="black", font=small, anchor="lm")
    image.save(path)


def plot_per_class_iou(setting_results: dict, path: str, title: str, width: int = 640) -> None:
    """Horizontal bars of per-class IoU, best first; undefined classes (n/a) at the end."""
    rows = [(name, v["iou"]) for name, v in setting_results["per_class"].items()]
    rows.sort(key=lambda row: (row[1] is None, -(row[1] or 0.0)))
    font, small = _font(14), _font(11)
    row_height, top, bottom = 18, 40, 30
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = min(220, 12 + max(int(measure.textlength(name, font=small)) for name, _ in rows))
    bar_left, bar_right = label_width + 10, width - 60
    height = top + bottom + row_height * len(rows)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 16), title, fill="black", font=font, anchor="mm")
    for i in range(6):
        x = bar_left + i / 5 * (bar_right - bar_left)
        draw.line([(x, top - 4), (x, height - bottom)], fill=(225, 225, 225))
        draw.text((x, height - bottom + 6), f"{i / 5:.1f}", fill="black", font=small, anchor="mt")
    for k, (name, iou) in enumerate(rows):
        y = top + k * row_height
        label = name if len(name) <= 32 else name[:31] + "…"
        draw.text((bar_left - 6, y + row_height / 2), label, fill="black", font=small, anchor="rm")
        if iou is None:
            draw.text((bar_left + 4, y + row_height / 2), "n/a", fill=(150, 150, 150), font=small, anchor="lm")
            continue
        x = bar_left + max(iou, 0.0) * (bar_right - bar_left)
        draw.rectangle([bar_left, y + 3, max(x, bar_left + 1), y + row_height - 3], fill=PLOT_COLORS[0])
        draw.text((x + 4, y + row_height / 2), f"{100 * iou:.1f}", fill="black", font=small, anchor="lm")
    draw.line([(bar_left, top - 4), (bar_left, height - bottom)], fill="black")
    image.save(path)


if __name__ == "__main__":
    main(sys.argv[1:])
