#!/usr/bin/env python
"""Evaluate a DiGSeg pipeline on a dataset split: mIoU and friends, per setting of ensemble size x steps.

    accelerate launch training/evaluate.py --pipeline path/or/hub-id [--adapter path/or/hub-id] \
        --dataset_format ade20k --dataset_root /data/ADEChallengeData2016 --split validation \
        --settings 1x1 4x2 --output_dir eval-ade20k

Closed vocabulary (default): every dataset class prompts every image. Open vocabulary (``--proposer PATH``, or
``pipeline`` for the proposer saved with it): a CLIP class proposer picks each image's candidates; pixels of
classes not proposed count as misses.

Each process takes the examples whose index modulo the number of processes is its rank, and saves its counts under
``OUTPUT/partial/`` every ``--checkpoint_every`` images (``--resume`` continues with the same number of processes);
the counts are summed with ``accelerator.reduce``. Writes ``evaluation.json`` (``card_metrics`` feeds
``digseg_diffusers.hub.cards.card_metadata``), ``evaluation.md`` and PNG plots; the metrics live in
``digseg_diffusers.evaluation.runner``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from digseg_diffusers.data.readers import BACKGROUND_INDEX, READERS, build_reader, read_class_names_file
from digseg_diffusers.evaluation.runner import (
    DEFAULT_CURVE_THRESHOLDS,
    EvaluationAccumulator,
    EvaluationSetting,
    card_metrics,
    evaluate_example,
    load_partial,
    save_partial,
)
from digseg_diffusers.evaluation.report import CURVE_PLOT_NAME, REPORT_NAME, RESULTS_NAME, write_evaluation_report
from digseg_diffusers.evaluation.metrics import to_jsonable

logger = logging.getLogger("digseg.evaluate")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PARTIAL_DIR = "partial"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a DiGSeg pipeline on a segmentation dataset split.")
    model = parser.add_argument_group("model")
    model.add_argument("--pipeline", required=True, help="DiGSeg pipeline folder or Hub id.")
    model.add_argument("--adapter", default=None, help="DiGSeg adapter (folder or Hub id) loaded onto the pipeline.")
    model.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Weights' dtype for inference (float16 / bfloat16 on GPUs).")
    model.add_argument(
        "--proposer",
        default=None,
        help="Open-vocabulary protocol: a saved DiGSegClassProposer or CLIP checkpoint (folder or Hub id), or "
        "'pipeline' for the proposer saved with the pipeline. Without it: closed vocabulary.",
    )
    model.add_argument("--proposer_global_threshold", type=float, default=None, help="Class proposer: image-level score threshold (default: the proposer's).")
    model.add_argument("--proposer_patch_threshold", type=float, default=None, help="Negative disables patches.")
    model.add_argument("--proposer_top_k", type=int, default=None, help="Class proposer: at most this many classes per image (default: the proposer's).")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_format", choices=sorted(READERS), default="folder", help="Dataset layout: 'folder' (docs/data_format.md) or a benchmark's own layout.")
    data.add_argument("--dataset_root", required=True, help='Root folder of the dataset.')
    data.add_argument("--split", default="val", help="Split name (e.g. val, validation, val2017).")
    names = data.add_mutually_exclusive_group()
    names.add_argument("--class_names_file", default=None, help="Class names to prompt with, one per line.")
    names.add_argument("--vocabulary", default=None, help="Bundled vocabulary whose names to prompt with.")
    data.add_argument("--max_images", type=int, default=None, help="Evaluate only the first N images.")
    data.add_argument("--dataset_name", default=None, help="Dataset name for the model card (default: the format).")

    run = parser.add_argument_group("inference")
    run.add_argument("--settings", nargs="+", default=["1x1"], help="ENSEMBLExSTEPS settings, e.g. 1x1 4x2.")
    run.add_argument("--processing_resolution", type=int, default=None, help="Default: the pipeline's config.")
    run.add_argument("--mask_threshold", type=float, default=None, help="Mask threshold tau (default: the model's).")
    run.add_argument("--background_threshold", type=float, default=None, help="Label-map background threshold (default: the model's, else --mask_threshold).")
    run.add_argument("--batch_size", type=int, default=8, help="Rows per U-Net call (never changes results).")
    run.add_argument("--seed", type=int, default=0, help="Example i uses a generator seeded with seed + i.")
    run.add_argument("--curve_thresholds", type=float, nargs="+", default=list(DEFAULT_CURVE_THRESHOLDS), help='Thresholds of the IoU-vs-threshold curve (default 0.05 ... 0.95).')

    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", required=True, help='evaluation.json, evaluation.md, the plots and resumable partial results go here.')
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
    given = {name: getattr(args, f"proposer_{name}") for name in ("global_threshold", "patch_threshold", "top_k")}
    overrides = {name: value for name, value in given.items() if value is not None}
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
    inference_options = {
        "processing_resolution": args.processing_resolution,
        "mask_threshold": args.mask_threshold,
        "background_threshold": args.background_threshold,
    }
    pipeline_kwargs = {**inference_options, "batch_size": args.batch_size}

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
        shards_now = f"-of-{world:03d}.pt"
        other_runs = sorted(p.name for p in Path(partial_dir).glob("shard-*") if not p.name.endswith(shards_now))
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

    resolved = pipe.resolve_call_defaults(**inference_options)  # the values the pipeline used
    inference = {**{name: resolved[name] for name in inference_options}, "dtype": args.dtype, "seed": args.seed}
    results = build_results(args, reader, totals, num_examples, world, include_background, proposer, inference)
    write_evaluation_report(results, args.output_dir)
    logger.info(f"wrote {os.path.join(args.output_dir, RESULTS_NAME)} and {REPORT_NAME}")
    accelerator.end_training()
    return results


def build_results(
    args, reader, totals: dict, num_examples: int, world: int, include_background: bool, proposer, inference: dict
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
            "inference": inference,
            "num_processes": world,
            "primary_setting": primary,
            "card_metrics": card_metrics(settings[primary]),
            "settings": settings,
        }
    )


if __name__ == "__main__":
    main(sys.argv[1:])
