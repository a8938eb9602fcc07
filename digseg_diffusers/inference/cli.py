"""The `digseg` command line: segment images with text prompts, or run the embedded demo.

    digseg demo --out demo_out
    digseg segment photo.png --prompt circle --prompt star --out results/
    digseg segment --input_dir photos/ -p @prompts.txt --out results/

A thin layer over `DiGSegPipeline` and the dataset engine `inference.batch.DatasetRun`, which IMAGE files and
datasets share (one naming scheme, one lock on --out, resumable, nothing overwritten without --overwrite). Every
user error ends with one line on stderr and exit code 2; arguments and input files are checked before the heavy
imports (torch, diffusers), so a wrong path fails at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np  # numpy and PIL come with the palette helpers anyway; torch and diffusers only when needed
from PIL import Image

from digseg_diffusers.atomic_io import atomic_write_json, is_disk_full
from digseg_diffusers.demo import DEMO_MODEL_NAME, demo_model_summary
from digseg_diffusers.inference.batch import (
    OUTPUT_FORMATS,
    BatchInferenceError,
    BatchOptions,
    MasksAndOverlay,
    error_summary,
    foreign_entries,
    lock_output_folder,
    mask_file_name,
    read_json,
    remove_leftover_temporaries,
    resolved_settings,
    save_png,
    write_masks_and_overlay,
)
from digseg_diffusers.inference.visualization import (
    LABEL_PNG_ENCODINGS,
    colorize_label_map,
    label_map_image,
    legend_image,
    titled_row,
)
from digseg_diffusers.prompts import parse_prompts

EXIT_USAGE = 2
EXIT_FAILURE = 1
SUMMARY_NAME = "summary.json"
"""The demo's summary (`digseg demo`); segment runs write `inference.batch.SUMMARY_NAME`."""
MAX_PROMPT_LINES = 20
"""Per-image console lines list at most this many prompts (all of them are in the image's JSON)."""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _number(convert: type, low: float, high: float | None, description: str):
    """An argparse `type` for numbers in [low, high] that names the expectation in its error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not (low <= value and (high is None or value <= high)):  # written so that NaN is refused too
            raise argparse.ArgumentTypeError(f"expected {description}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, None, "a positive integer")
_non_negative_int = _number(int, 0, None, "a non-negative integer")
_probability = _number(float, 0.0, 1.0, "a number in [0, 1]")


def _spellings(option: str) -> list[str]:
    """``--batch_images`` -> both ``--batch_images`` and ``--batch-images``: users type either."""
    body = option[2:]
    return list(dict.fromkeys([option, "--" + body.replace("-", "_"), "--" + body.replace("_", "-")]))


def _option(group, option: str, *short: str, **kwargs):
    return group.add_argument(*_spellings(option), *short, **kwargs)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help already says it, or there is none); descriptions and
    examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and inference")
    _option(group, "--model", default=DEMO_MODEL_NAME, help=f"DiGSeg pipeline folder or Hub id ({DEMO_MODEL_NAME!r}: the embedded demo model).")
    _option(group, "--adapter", default=None, help="A DiGSeg adapter folder or Hub id to load onto the model.")
    _option(group, "--steps", type=_positive_int, default=None, help="Denoising steps per query (default: the model's, 1).")
    _option(group, "--ensemble", type=_positive_int, default=1, help="Noise seeds averaged per query.")
    _option(group, "--resolution", type=_non_negative_int, default=None, help="Processing resolution, longest side (default: the model's; 0 = native).")
    _option(group, "--threshold", type=_probability, default=None, help="Mask threshold tau (default: the model's).")
    _option(group, "--background_threshold", type=_probability, default=None, help="Label-map background threshold (default: --threshold).")
    _option(group, "--seed", type=_non_negative_int, default=0, help="Noise seed.")
    _option(group, "--batch_size", type=_positive_int, default=8, help="Queries per U-Net call (memory only).")
    _option(group, "--device", default="auto", help='"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps".')
    _option(group, "--overwrite", action="store_true", help="Write into an --out that holds other files or results of other settings: files named like this run's outputs are replaced, others are left alone.")
    _option(group, "--quiet", action="store_true", help="No progress bar.")


SEGMENT_EXAMPLES = """examples:
  digseg segment photo.png -p circle -p star --out results/
  digseg segment photo.png -p "circle, star" --out results/          # commas separate prompts
  digseg segment photo.png -p @prompts.txt --out results/            # prompts from a file (commas or lines)
  digseg segment --input_dir photos/ -p circle --out results/ --format coco

outputs per image (OUT/<name> mirrors the image's path): <name>.png (label map: pixel value = label, 0 = background,
k + 1 = prompt k), <name>.json (prompts, areas, scores; written last), <name>.overlay.png and <name>.masks/ (IMAGE
files only); OUT/digseg_summary.json for the run. A rerun with the same settings skips finished images.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digseg",
        description="DiGSeg: text-prompted segmentation with a diffusion U-Net that generates mask latents.\n"
        + demo_model_summary(),
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    segment = commands.add_parser(
        "segment",
        help="Segment images with text prompts.",
        description="Segment each IMAGE (or each image of a dataset) once per prompt.\n" + demo_model_summary(),
        epilog=SEGMENT_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    segment.add_argument("images", nargs="*", metavar="IMAGE", help="Image files (PNG, JPEG, ...); for a folder use --input_dir.")
    _option(segment, "--prompt", "-p", action="append", default=None, metavar="PROMPT",
            help='A class name or phrase; repeat for several. Commas separate prompts ("cat, dog" = 2); @FILE reads them from FILE.')  # fmt: skip
    _option(segment, "--prompts_file", action="append", default=None, metavar="FILE", help="A text file of prompts (one per line, or comma-separated).")
    _option(segment, "--out", "-o", required=True, help="Output folder (created if needed; new, empty, or one of earlier digseg results).")
    dataset = segment.add_argument_group(
        "datasets (instead of IMAGE...; run under `accelerate launch` for several processes or machines)",
        "Label map + JSON per image, resumable; see docs/dataset_inference.md.",
    )
    sources = dataset.add_mutually_exclusive_group()
    _option(sources, "--input_dir", default=None, help="Every image file under this folder, recursively.")
    _option(sources, "--input_list", default=None, help="A text file of image paths, one per line.")
    _option(sources, "--dataset", default=None, metavar="HF_DATASET[:SPLIT]", help="A Hugging Face dataset (needs `pip install datasets`).")
    _option(dataset, "--batch_images", type=_positive_int, default=1, help="Images of the same size per pipeline call.")
    _option(dataset, "--format", choices=OUTPUT_FORMATS, default="png", help="png: label map + JSON per image; coco: also COCO RLE masks and OUT/annotations_coco.json.")
    _option(dataset, "--label_png", choices=LABEL_PNG_ENCODINGS, default="auto", help="Label-map PNG: palette (<= 255 prompts), 16bit, or auto (palette up to 255 prompts, else 16bit).")
    _add_model_arguments(segment)

    demo = commands.add_parser(
        "demo",
        help="Generate a synthetic scene and segment it with the embedded demo model.",
        description="Draws a held-out scene of the synthetic shape world (test-split seeds, never trained on), "
        "segments it with its true classes plus one absent class, and writes the outputs, the ground truth, a "
        "panel (image | truth | prediction, with a colour legend) and the scene's IoU into --out.\n" + demo_model_summary(),
        epilog="example:\n  digseg demo --out demo_out --scene 3",
        formatter_class=_HelpFormatter,
    )
    _option(demo, "--out", "-o", required=True, help="Output folder (created if needed).")
    _option(demo, "--scene", type=_non_negative_int, default=0, help="Which test scene to draw.")
    _option(demo, "--no_absent_class", action="store_true", help="Do not add a class that is absent from the scene.")
    _add_model_arguments(demo)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Checks before the heavy imports (standard library only)
# ----------------------------------------------------------------------------------------------------------------

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _read_prompts_file(path: str, how: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"{how}: prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"{how}: cannot read prompts file {path}: {getattr(error, 'strerror', None) or error}") from None
    prompts = parse_prompts(text)
    if not prompts:
        raise CLIError(f"{how}: prompts file {path} holds no prompts (one per line, or comma-separated)")
    return prompts


def collect_prompts(values: Sequence[str] | None, files: Sequence[str] | None = None) -> list[str]:
    """The prompts of ``-p`` values (split with the shared comma/newline rule, `prompts.parse_prompts`), ``-p @FILE``
    and ``--prompts_file FILE``, in order, each once; `CLIError` for an empty value or a prompt that is a file name."""
    prompts: list[str] = []
    for value in values or []:
        if value.startswith("@") and len(value) > 1:
            prompts += _read_prompts_file(value[1:], f"--prompt {value}")
            continue
        if os.path.isfile(value):
            raise CLIError(f"--prompt {value!r} names a file; to read prompts from it use -p @{value} or --prompts_file {value}")
        parsed = parse_prompts(value)
        if not parsed:
            raise CLIError(f"--prompt must not be empty (got {value!r})")
        prompts += parsed
    for path in files or []:
        prompts += _read_prompts_file(path, f"--prompts_file {path}")
    if not prompts:
        raise CLIError("give at least one prompt: -p NAME (repeatable, or comma-separated), -p @FILE or --prompts_file FILE")
    return list(dict.fromkeys(prompts))


def check_image_paths(paths: Sequence[str]) -> None:
    """Fail at once, with the way out, on IMAGE arguments that cannot be image files (no heavy import needed)."""
    for path in paths:
        if _URL.match(path):
            raise CLIError(f"{path}: URLs are not downloaded; save the image and give its file path")
        if os.path.isdir(path):
            raise CLIError(f"{path} is a folder, not an image; to segment every image in it use --input_dir {path}")
        if not os.path.exists(path):
            raise CLIError(f"image not found: {path} (no such file; the current folder is {os.getcwd()})")
        if not os.path.isfile(path):
            raise CLIError(f"{path} is not a regular file")


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str):
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown --device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if not {"cuda": torch.cuda.is_available(), "mps": mps}.get(device.type, True):
        raise CLIError(f"--device {name} was asked for, but {device.type.upper()} is not available")
    return device


def load_pipeline(model: str, adapter: str | None, device_name: str):
    """Load the pipeline (and adapter) or raise `CLIError` with a one-line reason."""
    from digseg_diffusers.pipeline_digseg import DiGSegPipeline

    device = _resolve_device(device_name)
    import diffusers
    import transformers

    bars = (diffusers.utils.logging, transformers.utils.logging)
    were_enabled = [module.is_progress_bar_enabled() for module in bars]
    for module in bars:  # "Loading pipeline components" bars are noise for a command-line user
        module.disable_progress_bar()
    try:
        pipe = DiGSegPipeline.from_pretrained(model)
    except Exception as error:  # OSError, ValueError, HTTP errors, missing files: all mean "cannot load"
        raise CLIError(f"cannot load the model {model!r}: {error_summary(error)}") from None
    finally:
        for module, enabled in zip(bars, were_enabled):
            if enabled:
                module.enable_progress_bar()
    if adapter:
        try:
            pipe.load_digseg_adapter(adapter)
        except Exception as error:
            raise CLIError(f"cannot load the adapter {adapter!r}: {error_summary(error)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _note_prompts_outside_vocabulary(pipe, prompts: Sequence[str], model: str, announce: bool) -> list[str]:
    """Say once, before any compute, which prompts the model was not trained on; return them (for the summaries)."""
    # The line below says it, so the pipeline does not log the same warning at its first call.
    outside = pipe.prompts_outside_vocabulary(list(prompts), mark_reported=True)
    if outside and announce:
        shown = ", ".join(map(repr, outside[:10])) + (f" and {len(outside) - 10} more" if len(outside) > 10 else "")
        known = ", ".join(pipe.config.training_vocabulary)
        print(f"digseg: note: prompts outside what --model {model} was trained on ({known}): {shown}; their masks are not meaningful", file=sys.stderr)
    return outside


def _pipeline_kwargs(args: argparse.Namespace) -> dict:
    return {
        "num_inference_steps": args.steps,
        "ensemble_size": args.ensemble,
        "processing_resolution": args.resolution,
        "mask_threshold": args.threshold,
        "background_threshold": args.background_threshold,
        "batch_size": args.batch_size,
    }


# ----------------------------------------------------------------------------------------------------------------
# segment: IMAGE files and datasets, one engine
# ----------------------------------------------------------------------------------------------------------------


def command_segment(args: argparse.Namespace) -> dict:
    prompts = collect_prompts(args.prompt, args.prompts_file)
    dataset_inputs = args.input_dir or args.input_list or args.dataset
    if dataset_inputs and args.images:
        raise CLIError("give either IMAGE files or one of --input_dir / --input_list / --dataset, not both")
    if not dataset_inputs and not args.images:
        raise CLIError("give IMAGE files, or one of --input_dir / --input_list / --dataset")
    images_mode = bool(args.images)
    # BatchOptions refuses a bad --format or --label_png here, before any work
    options = BatchOptions(
        prompts=prompts, batch_images=args.batch_images, seed=args.seed, label_png=args.label_png,
        output_format=args.format, pipeline_kwargs=_pipeline_kwargs(args),
        progress=not args.quiet and not images_mode, extras=MasksAndOverlay() if images_mode else None,
    )  # fmt: skip
    if images_mode:
        check_image_paths(args.images)
    return _run_engine(args, options)


def _run_engine(args: argparse.Namespace, options: BatchOptions) -> dict:
    """`inference.batch.DatasetRun` over the IMAGE files (with masks and overlay per image) or the dataset."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from digseg_diffusers.inference.batch import DatasetRun, FolderSource, HFDatasetSource, ListSource, PathsSource

    images_mode = bool(args.images)
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))  # gloo on CPUs
    if images_mode:
        source = PathsSource(args.images)
    elif args.input_dir:
        source = FolderSource(args.input_dir)
    elif args.input_list:
        source = ListSource(args.input_list)
    else:
        source = HFDatasetSource(args.dataset)
    with DatasetRun(source, args.out, state, overwrite=args.overwrite) as run:  # locks --out, lists the inputs
        device = args.device
        if device == "auto" or (device == "cuda" and state.device.type == "cuda"):
            device = str(state.device)  # under accelerate launch: each process on its own GPU
        start = time.perf_counter()
        pipe = load_pipeline(args.model, args.adapter, device)
        load_seconds = time.perf_counter() - start
        _note_prompts_outside_vocabulary(pipe, options.prompts, args.model, state.is_main_process)
        report = _ImageLines(Path(args.out), len(run.items), state.num_processes) if images_mode else None
        summary = run.run(pipe, options, describe={"model": args.model, "adapter": args.adapter}, on_image_done=report)
    return {
        "command": "segment-images" if images_mode else "segment-dataset", "is_main_process": state.is_main_process,
        "out": str(args.out), "load_model_seconds": load_seconds, **summary,
    }  # fmt: skip


class _ImageLines:
    """Prints each image's result as it finishes: where its files are and, per prompt, labelled numbers."""

    def __init__(self, out: Path, total: int, num_processes: int):
        self.out, self.total, self.done = out, total, 0
        self.of = f"/{total}" if num_processes == 1 else f" (this process; {total} in all)"

    def __call__(self, event: dict) -> None:
        self.done += 1
        where = f"[{self.done}{self.of}] {event['key']}"
        if event["status"] == "failed":
            print(f"{where}: failed: {event['reason']}", flush=True)
            return
        document = event["document"]
        state = "already complete (same input and settings), kept" if event["status"] == "skipped" else f"{document['segment_seconds']:.2f} s"
        print(f"{where}: {state} -> {self.out / document['label_map']} (label map), {self.out / document['overlay']}, "
              f"masks in {self.out / (event['name'] + '.masks')}", flush=True)  # fmt: skip
        entries = document.get("prompts", [])
        for entry in entries[:MAX_PROMPT_LINES]:
            print(
                f"    {entry['prompt']:<16} mask covers {100 * entry['mask_area_fraction']:5.1f} % of the image, "
                f"label map {100 * entry['label_area_fraction']:5.1f} %, max probability {entry['max_probability']:.2f}",
                flush=True,
            )
        if len(entries) > MAX_PROMPT_LINES:
            print(f"    ... {len(entries) - MAX_PROMPT_LINES} more prompts in {self.out / (event['name'] + '.json')}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------------


class ResultFolder:
    """The demo's output folder, written so that a kill or a rerun never leaves it mixing two runs: `begin` claims
    it with a provisional summary.json (``"status": "incomplete"``, the files about to be written and the previous
    run's files); `finish` removes the previous run's files this one did not rewrite (masks of other prompts), then
    writes the final summary.json (``"status": "complete"``)."""

    def __init__(self, folder: Path, source: str, image: str):
        self.folder, self.source, self.image = Path(folder), source, image
        self._stale: set[str] = set()

    def begin(self, planned_files: Sequence[str]) -> None:
        remove_leftover_temporaries(self.folder)  # from a killed writer (the caller holds the lock)
        previous = read_json(self.folder / SUMMARY_NAME) or {}
        if not str(previous.get("source", "")).startswith("digseg demo"):  # not ours: name no file to remove
            previous = {}
        earlier = [entry.get("mask_file") for entry in previous.get("prompts", []) if isinstance(entry, dict)]
        earlier += previous.get("stale_files", []) + previous.get("files_being_written", [])
        self._stale = {name for name in earlier if isinstance(name, str) and Path(name).name == name} - set(planned_files)
        atomic_write_json(
            self.folder / SUMMARY_NAME,
            {"status": "incomplete", "source": self.source, "image": self.image,
             "files_being_written": list(planned_files), "stale_files": sorted(self._stale)},
        )  # fmt: skip

    def finish(self, summary: dict) -> None:
        for name in sorted(self._stale):
            (self.folder / name).unlink(missing_ok=True)
        atomic_write_json(self.folder / SUMMARY_NAME, {"status": "complete", "source": self.source, **summary})


def _check_demo_folder(out: Path, source: str, arguments: dict, overwrite: bool) -> None:
    """The demo writes into --out only if it is new, empty, or holds this same demo (scene and settings)."""
    if overwrite or not foreign_entries(out):
        return
    earlier = read_json(out / SUMMARY_NAME)
    if earlier is None or earlier.get("source") != source or earlier.get("arguments") != arguments:
        ours = earlier and str(earlier.get("source", "")).startswith("digseg demo")
        what = "the results of another demo scene or other settings" if ours else "other files"
        raise CLIError(f"--out {out} already holds {what}; choose another --out, or pass --overwrite to replace them")


def _demo_prompts(scene, seed: int, with_absent_class: bool) -> list[str]:
    from digseg_diffusers.data.synthetic import SHAPE_CLASSES

    prompts = list(scene.class_names)
    absent = [name for name in SHAPE_CLASSES if name not in prompts]
    if absent and with_absent_class:
        prompts.append(absent[int(np.random.default_rng(seed).integers(len(absent)))])
    return prompts


DEMO_ARGUMENTS = ("scene", "no_absent_class", "model", "adapter", "steps", "ensemble", "resolution", "threshold",
                  "background_threshold", "seed")  # fmt: skip
"""What the demo's outputs depend on: a rerun with the same values may replace them, others are refused."""


def command_demo(args: argparse.Namespace) -> dict:
    import torch
    from tqdm.auto import tqdm

    from digseg_diffusers.data.synthetic import SPLIT_SEED_OFFSETS, generate_scene

    seed = SPLIT_SEED_OFFSETS["test"] + args.scene
    source = f"digseg demo scene {seed}"
    arguments = {name: getattr(args, name) for name in DEMO_ARGUMENTS}
    out, pipeline_kwargs = Path(args.out), _pipeline_kwargs(args)
    with lock_output_folder(out):
        _check_demo_folder(out, source, arguments, args.overwrite)  # before the model loads
        scene = generate_scene(seed, size=64)
        prompts = _demo_prompts(scene, seed, not args.no_absent_class)
        start = time.perf_counter()
        pipe = load_pipeline(args.model, args.adapter, args.device)
        load_seconds = time.perf_counter() - start
        outside = _note_prompts_outside_vocabulary(pipe, prompts, args.model, announce=True)
        disable = True if args.quiet else None  # None: tqdm hides the bar when stderr is not a terminal
        with tqdm(total=0, desc="digseg demo", unit="U-Net call", disable=disable, leave=False) as bar:

            def count_unet_calls(done: int, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            segment_start = time.perf_counter()
            try:
                output = pipe(
                    scene.image, prompts, generator=torch.Generator().manual_seed(args.seed), output_type="np",
                    progress_callback=count_unet_calls, **pipeline_kwargs,
                )  # fmt: skip
            except ValueError as error:  # the pipeline refused an argument
                raise CLIError(error_summary(error)) from None
            segment_seconds = time.perf_counter() - segment_start
        masks = [mask_file_name(k, prompt, len(prompts)) for k, prompt in enumerate(prompts)]
        folder = ResultFolder(out, source=source, image=f"synthetic test scene {args.scene}")
        folder.begin(masks + ["label_map.png", "overlay.png", "ground_truth.png", "image.png", "panel.png"])
        summary = write_masks_and_overlay(out, "", "overlay.png", output, 0, scene.image)
        save_png(out / "label_map.png", label_map_image(np.asarray(output.label_maps[0]), len(prompts), "auto"))
        summary.update(_write_demo_extras(out, scene, prompts, output, seed))
        summary.update(
            {
                "arguments": arguments,
                "settings": {"model": args.model, "adapter": args.adapter, **resolved_settings(pipe, pipeline_kwargs),
                             "seed": args.seed, "device": str(pipe.device)},
                "prompts_outside_training_vocabulary": outside,
                "timings": {"load_model_seconds": load_seconds, "segment_seconds": segment_seconds},
            }
        )  # fmt: skip
        folder.finish(summary)
    return summary


def _write_demo_extras(out: Path, scene, prompts: list[str], output, seed: int) -> dict:
    """The demo's ground truth, input and comparison panel, and its scores."""
    from digseg_diffusers.data.synthetic import SHAPE_CLASSES
    from digseg_diffusers.evaluation.runner import BACKGROUND_NAME, EvaluationAccumulator

    # Ground truth in the prompts' label space (0 = background, k + 1 = prompt k), and the scene's IoU.
    truth = np.zeros_like(scene.label, dtype=np.int64)
    for k, name in enumerate(prompts):
        truth[scene.label == SHAPE_CLASSES.index(name) + 1] = k + 1
    save_png(out / "ground_truth.png", label_map_image(truth, len(prompts), "palette"))
    save_png(out / "image.png", Image.fromarray(scene.image))
    accumulator = EvaluationAccumulator(SHAPE_CLASSES, ignore_index=255, thresholds=())  # the benchmark's scoring
    accumulator.add(scene.validation_example().label, [SHAPE_CLASSES.index(p) for p in prompts], None, np.asarray(output.label_maps[0]))
    metrics = accumulator.compute()
    per_class = {name: metrics["per_class"][name]["iou"] for name in [BACKGROUND_NAME] + prompts}
    names = [p if p in scene.class_names else f"{p} (not in the scene)" for p in prompts]
    save_png(out / "panel.png", _panel(scene.image, truth, np.asarray(output.label_maps[0]), names))
    return {
        "command": "demo",
        "scene_seed": seed,
        "classes_present": list(scene.class_names),
        "classes_absent_queried": [p for p in prompts if p not in scene.class_names],
        "iou": {name: (None if value != value else float(value)) for name, value in per_class.items()},
        "mIoU": float(metrics["mIoU"]),
        "pixel_accuracy": float(metrics["pixel_accuracy"]),
    }


def _panel(image, truth, prediction, prompts: Sequence[str], scale: int = 4):
    """Image | ground truth | prediction side by side, enlarged (nearest) so 64 px scenes are easy to see, with a
    title over each tile and a legend (each class name next to its colour) below."""
    num_classes = len(prompts)
    tiles = [image, colorize_label_map(truth, num_classes, None), colorize_label_map(prediction, num_classes, None)]
    height, width = image.shape[:2]
    big = [np.asarray(Image.fromarray(tile).resize((width * scale, height * scale), Image.NEAREST)) for tile in tiles]
    row = titled_row(big, ["image", "ground truth", "prediction"], gap=4)
    legend = legend_image(["background", *prompts], width=row.width)
    panel = Image.new("RGB", (row.width, row.height + legend.height), (255, 255, 255))
    panel.paste(row, (0, 0))
    panel.paste(legend, (0, row.height))
    return panel


# ----------------------------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------------------------


def _print_summary(document: dict) -> None:
    if document.get("command") == "demo":
        if document["arguments"]["model"] == DEMO_MODEL_NAME:
            print(demo_model_summary())
        print(f"scene {document['scene_seed']}: classes {', '.join(document['classes_present'])}")
        for entry in document["prompts"]:
            iou = document["iou"].get(entry["prompt"])
            iou_text = f"IoU {iou:.3f}" if iou is not None else "absent from the scene (IoU undefined)"
            print(f"  {entry['prompt']:<12} mask covers {100 * entry['mask_area_fraction']:5.1f} % of the image  {iou_text}")
        print(f"  mIoU (incl. background) {document['mIoU']:.3f}; {document['timings']['segment_seconds']:.2f} s")
        return
    if not document["is_main_process"]:
        return
    if document["command"] == "segment-images":
        print(
            f"{document['images']} image(s): {document['segmented']} segmented, {document['skipped_complete']} already "
            f"complete; run summary in {Path(document['out']) / 'digseg_summary.json'}"
        )
        return
    print(
        f"{document['images']} images: {document['segmented']} segmented, {document['skipped_complete']} already "
        f"complete, {document['failed']} failed; {document['images_per_second']:.2f} images/s over "
        f"{document['num_processes']} process(es)"
    )
    for stats in document["per_process"]:
        print(f"  process {stats['process_index']}: {stats['segmented']} segmented in {stats['seconds']:.1f} s ({stats['images_per_second']:.2f} images/s)")
    for failure in document["failures"][:20]:
        print(f"  failed: {failure['image']}: {failure['reason']}")
    if document["failed"] > 20:
        print(f"  ... {document['failed'] - 20} more failures in {Path(document['out']) / 'digseg_summary.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints its own one-line error and exits with 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        document = command_segment(args) if args.command == "segment" else command_demo(args)
    except (CLIError, BatchInferenceError) as error:
        print(f"digseg: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("digseg: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if not is_disk_full(error):
            raise
        where, reason = error.filename or args.out, error.strerror or "no space left"
        print(f"digseg: error: the disk is full: cannot write {where} ({reason}); free some space or choose an --out "
              "on another disk, then run the same command again: finished results are kept and skipped",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    _print_summary(document)
    if document.get("is_main_process", True):
        print(f"outputs written to {args.out}")
    return 0  # a dataset run that completes exits 0 even when some images failed: they are listed in its summary


if __name__ == "__main__":
    sys.exit(main())
