"""The `digseg` command line: segment images with text prompts, or run the embedded demo.

    digseg demo --out demo_out
    digseg segment photo.png --prompt circle --prompt star --out results/

A thin layer over `DiGSegPipeline`: it parses arguments, loads the model, runs the pipeline once per image
(images of different sizes never share a call) and writes what comes out: one mask PNG per prompt, the label
map (palette PNG: pixel value = label, 0 = background, k + 1 = prompt k), a coloured overlay and a JSON summary.
Every user error (unreadable image, missing model, bad argument, unusable --out) ends with one line on stderr and
exit code 2.

With --input_dir, --input_list or --dataset instead of IMAGE files, it segments a whole dataset, under `accelerate
launch` on any number of processes and machines, resumably, into flat per-image outputs (label-map PNG + JSON,
optionally COCO RLE): see `batch_inference` and docs/dataset_inference.md.

Outputs are never lost or mixed: --out is checked (and locked against a second digseg process) before the model
is loaded; each input gets its own folder, named deterministically without collisions (`output_folder_names`);
every file is written atomically, and each folder's summary.json says whose results it holds and whether they are
complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic_io import TEMPORARY_SUFFIX, DirectoryLock, FolderLockedError, atomic_file, atomic_write_json
from .batch_inference import OUTPUT_FORMATS
from .visualization import LABEL_PNG_ENCODINGS

EXIT_USAGE = 2
SUMMARY_NAME = "summary.json"
LOCK_NAME = ".digseg.lock"

logger = logging.getLogger(__name__)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, description: str):
    """An argparse `type` for integers >= `minimum` that names the expectation in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {description}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import DEMO_MODEL_NAME

    group = parser.add_argument_group("model and inference")
    group.add_argument(
        "--model", default=DEMO_MODEL_NAME, help=f"DiGSeg pipeline folder or Hub id (default: {DEMO_MODEL_NAME!r}, the embedded demo model)."
    )
    group.add_argument("--adapter", default=None, help="A DiGSeg adapter folder or Hub id to load onto the model.")
    group.add_argument("--steps", type=_positive_int, default=None, help="Denoising steps per query (default: the model's, 1).")
    group.add_argument("--ensemble", type=_positive_int, default=1, help="Noise seeds averaged per query (default: 1).")
    group.add_argument(
        "--resolution", type=_non_negative_int, default=None, help="Processing resolution, longest side (default: the model's; 0 = native)."
    )
    group.add_argument("--threshold", type=_probability, default=None, help="Mask threshold tau (default: the model's).")
    group.add_argument(
        "--background-threshold", type=_probability, default=None, help="Label-map background threshold (default: --threshold)."
    )
    group.add_argument("--seed", type=_non_negative_int, default=0, help="Noise seed (default: 0).")
    group.add_argument("--batch-size", type=_positive_int, default=8, help="Queries per U-Net call (memory only; default: 8).")
    group.add_argument("--device", default="auto", help='"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps".')
    group.add_argument("--quiet", action="store_true", help="No progress bar.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digseg",
        description="DiGSeg: text-prompted segmentation with a diffusion U-Net that generates mask latents.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    segment = commands.add_parser(
        "segment",
        help="Segment images with text prompts.",
        description="Segment each IMAGE once per --prompt; writes masks, the label map, an overlay and summary.json "
        "into --out (one subfolder per image when there are several).",
    )
    segment.add_argument("images", nargs="*", metavar="IMAGE", help="Image files (PNG, JPEG, ...).")
    segment.add_argument("--prompt", "-p", action="append", required=True, help="A class name or phrase; repeat for several.")
    segment.add_argument("--out", "-o", required=True, help="Output folder (created if needed).")
    dataset = segment.add_argument_group(
        "datasets (instead of IMAGE...; run under `accelerate launch` for several processes or machines)",
        "Flat, resumable outputs: OUT/<relative path>.png (label map) + .json per image; see docs/dataset_inference.md.",
    )
    sources = dataset.add_mutually_exclusive_group()
    sources.add_argument("--input_dir", "--input-dir", default=None, help="Every image file under this folder, recursively.")
    sources.add_argument("--input_list", "--input-list", default=None, help="A text file of image paths, one per line.")
    sources.add_argument("--dataset", default=None, metavar="HF_DATASET[:SPLIT]", help="A Hugging Face dataset (needs `pip install datasets`).")
    dataset.add_argument(
        "--batch_images", "--batch-images", type=_positive_int, default=1, help="Images of the same size per pipeline call (default: 1)."
    )
    dataset.add_argument(
        "--format", choices=OUTPUT_FORMATS, default="png", help="png: label map + JSON per image; coco: also COCO RLE masks and OUT/annotations_coco.json."
    )
    dataset.add_argument(
        "--label_png", "--label-png", choices=LABEL_PNG_ENCODINGS, default="auto", help="Label-map PNG: palette (<= 255 prompts), 16bit, or auto."
    )
    _add_model_arguments(segment)

    demo = commands.add_parser(
        "demo",
        help="Generate a synthetic scene and segment it with the embedded demo model.",
        description="Draws a held-out scene of the synthetic shape world (test-split seeds, never trained on), "
        "segments it with its true classes plus one absent class, and writes the outputs, the ground truth and the "
        "scene's IoU into --out.",
    )
    demo.add_argument("--out", "-o", required=True, help="Output folder (created if needed).")
    demo.add_argument("--scene", type=_non_negative_int, default=0, help="Which test scene to draw (default: 0).")
    demo.add_argument("--no-absent-class", action="store_true", help="Do not add a class that is absent from the scene.")
    _add_model_arguments(demo)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown --device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} was asked for, but CUDA is not available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name} was asked for, but MPS is not available")
    return device


def load_pipeline(model: str, adapter: str | None, device_name: str, quiet_loading: bool = True):
    """Load the pipeline (and adapter) or raise `CLIError` with a one-line reason."""
    from .pipeline_digseg import DiGSegPipeline

    device = _resolve_device(device_name)
    import diffusers
    import transformers

    bars = (diffusers.utils.logging, transformers.utils.logging)
    were_enabled = [module.is_progress_bar_enabled() for module in bars]
    if quiet_loading:  # "Loading pipeline components" bars are noise for a command-line user
        for module in bars:
            module.disable_progress_bar()
    try:
        pipe = DiGSegPipeline.from_pretrained(model)
    except Exception as error:  # OSError, ValueError, HTTP errors, missing files: all mean "cannot load"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"cannot load the model {model!r}: {reason}") from None
    finally:
        for module, enabled in zip(bars, were_enabled):
            if enabled:
                module.enable_progress_bar()
    if adapter:
        try:
            pipe.load_digseg_adapter(adapter)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CLIError(f"cannot load the adapter {adapter!r}: {reason}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_image(path: str) -> np.ndarray:
    """``[H, W, 3]`` float32 RGB in [0, 1] of an image file (16-bit precision kept), or `CLIError` naming the file."""
    from .image_processing import open_image, to_float_rgb

    try:
        with open_image(path) as image:
            return to_float_rgb(image)
    except ValueError as error:
        raise CLIError(str(error)) from None


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return name[:60] or "prompt"


def _name_candidate(path: str, position: int, level: int) -> str:
    """Ever more specific folder names for one input: its stem; file name; parent folder and file name; file
    name and a hash of its absolute path; then that and its position on the command line."""
    file = Path(path)
    if level == 0:
        return _safe_name(file.stem)
    if level == 1:
        return _safe_name(file.name)
    if level == 2:
        return _safe_name(f"{file.resolve().parent.name}_{file.name}")
    digest = hashlib.sha1(str(file.resolve()).encode("utf-8")).hexdigest()[:8]
    name = f"{_safe_name(file.name)}-{digest}"
    return name if level == 3 else f"{name}-{position + 1}" + (f"-{level - 4}" if level > 4 else "")


def _read_summary(folder: Path) -> dict | None:
    try:
        document = json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def _folder_is_free_for(folder: Path, source: str) -> bool:
    """May the results of `source` go into `folder`? Yes if it is absent, empty, or already holds them."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if not [p for p in folder.iterdir() if p.name != LOCK_NAME and not _is_temporary(p)]:
        return True
    summary = _read_summary(folder)
    return summary is not None and summary.get("source") == source


def output_folder_names(paths: Sequence[str], out_root: str | os.PathLike | None = None) -> list[str]:
    """One distinct subfolder name per input, the same for the same inputs and the same --out.

    An input's name is its file stem while that is unambiguous; inputs whose names collide (``a.png`` and
    ``a.jpg``; ``x/a.png`` and ``y/a.png``; ``A.png`` and ``a.png``, for case-insensitive disks) all move on to
    a more specific name: the file name with its extension (``a.png``), then with its folder's name
    (``x_a.png``), then with a hash of its absolute path, then with its position.
    A folder already in `out_root` is reused only if it is empty or holds this same input's results (its
    summary.json names the input); otherwise the input takes its next name, so earlier results are never
    overwritten by another image's.
    """
    root = Path(out_root) if out_root is not None else None
    sources = [str(Path(path).resolve()) for path in paths]
    levels = [0] * len(paths)
    reserved = {SUMMARY_NAME, LOCK_NAME}
    while True:
        names = [_name_candidate(path, i, level) for i, (path, level) in enumerate(zip(paths, levels))]
        keys = [name.casefold() for name in names]
        counts = {key: keys.count(key) for key in keys}
        clashing = [
            counts[key] > 1 or name in reserved or (root is not None and not _folder_is_free_for(root / name, source))
            for name, key, source in zip(names, keys, sources)
        ]
        if not any(clashing):
            return names
        levels = [level + 1 if clash else level for level, clash in zip(levels, clashing)]


def _pipeline_kwargs(args: argparse.Namespace) -> dict:
    return {
        "num_inference_steps": args.steps,
        "ensemble_size": args.ensemble,
        "processing_resolution": args.resolution,
        "mask_threshold": args.threshold,
        "background_threshold": args.background_threshold,
        "batch_size": args.batch_size,
    }


def run_pipeline(pipe, image: np.ndarray, prompts: list[str], args: argparse.Namespace, progress=None):
    """One pipeline call for one image; pipeline ValueErrors (bad arguments) become `CLIError`."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    done_before = progress.n if progress is not None else 0

    def callback(done: int, total: int) -> None:
        if progress is not None:
            progress.total = max(progress.total or 0, done_before + total)
            progress.n = done_before + done
            progress.refresh()

    try:
        return pipe(image, prompts, generator=generator, output_type="np", progress_callback=callback, **_pipeline_kwargs(args))
    except ValueError as error:
        raise CLIError(str(error).strip().splitlines()[0]) from None


def _mask_file_name(k: int, prompt: str) -> str:
    return f"mask_{k:02d}_{_safe_name(prompt)}.png"


class ResultFolder:
    """One image's output folder, written so that a kill or a rerun never leaves it mixing two runs.

    `begin` claims the folder with a provisional summary.json (``"status": "incomplete"``, the input it is for,
    the files about to be written and the previous run's files); every file is then written atomically; files of
    the previous run that this one does not rewrite (masks of other prompts) are removed; the final
    summary.json (``"status": "complete"``) comes last.
    """

    def __init__(self, folder: Path, source: str, image: str):
        self.folder, self.source, self.image = Path(folder), source, image
        self._stale: set[str] = set()

    def begin(self, planned_files: Sequence[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(f".*{TEMPORARY_SUFFIX}"):  # from a killed writer (we hold the lock)
            if leftover.is_file():
                leftover.unlink()
        previous = _read_summary(self.folder) or {}
        earlier = [entry.get("mask_file") for entry in previous.get("prompts", []) if isinstance(entry, dict)]
        earlier += previous.get("stale_files", []) + previous.get("files_being_written", [])
        self._stale = {name for name in earlier if isinstance(name, str) and Path(name).name == name} - set(planned_files)
        atomic_write_json(
            self.folder / SUMMARY_NAME,
            {"status": "incomplete", "source": self.source, "image": self.image,
             "files_being_written": list(planned_files), "stale_files": sorted(self._stale)},
        )  # fmt: skip

    def save_image(self, name: str, image) -> None:
        with atomic_file(self.folder / name) as tmp:
            image.save(tmp, format="PNG")

    def finish(self, summary: dict) -> None:
        for name in sorted(self._stale):
            (self.folder / name).unlink(missing_ok=True)
        atomic_write_json(self.folder / SUMMARY_NAME, {"status": "complete", "source": self.source, **summary})


def write_outputs(folder: ResultFolder, image: np.ndarray, prompts: list[str], output, index: int = 0) -> dict:
    """Write the masks, label map and overlay of one image; return the per-prompt summary entries."""
    from PIL import Image

    from .visualization import label_map_image, overlay

    masks = np.asarray(output.masks[index])
    probabilities = np.asarray(output.probabilities[index])
    label_map = np.asarray(output.label_maps[index])
    entries = []
    for k, prompt in enumerate(prompts):
        file_name = _mask_file_name(k, prompt)
        folder.save_image(file_name, Image.fromarray(masks[k].astype(np.uint8) * 255, mode="L"))
        entries.append(
            {
                "prompt": prompt,
                "label": k + 1,
                "mask_file": file_name,
                "mask_area_fraction": float(masks[k].mean()),
                "label_area_fraction": float((label_map == k + 1).mean()),
                "max_probability": float(probabilities[k].max()),
            }
        )
    folder.save_image("label_map.png", label_map_image(label_map, len(prompts), "palette"))
    folder.save_image("overlay.png", Image.fromarray(overlay(image, label_map, num_classes=len(prompts))))
    return {"prompts": entries, "background_area_fraction": float((label_map == 0).mean())}


def _output_files(prompts: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    return [_mask_file_name(k, prompt) for k, prompt in enumerate(prompts)] + ["label_map.png", "overlay.png", *extra]


def lock_output_root(out: str) -> DirectoryLock:
    """Create and lock --out before any model work, or raise `CLIError` saying why it cannot be used."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return DirectoryLock(root, LOCK_NAME).acquire()  # creating the lock file also proves the folder writable
    except FolderLockedError as error:
        raise CLIError(f"--out {out}: {error}; wait for it to finish or choose another --out") from None
    except OSError as error:
        raise CLIError(f"--out {out} is not a writable folder: {error.strerror or error}") from None


def _check_writable(folder: Path, out: str) -> None:
    """An existing result folder must take new files (checked before the model runs)."""
    if not folder.is_dir():
        return
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise CLIError(f"--out {out}: cannot write into {folder}: {error.strerror or error}") from None


def _progress_bar(args: argparse.Namespace, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=0, desc=description, unit="U-Net call", disable=True if args.quiet else None, leave=False)


def _inference_settings(pipe, args: argparse.Namespace) -> dict:
    resolved = pipe.resolve_call_defaults(args.steps or None, args.resolution, args.threshold, args.background_threshold)
    return {
        "model": args.model,
        "adapter": args.adapter,
        "steps": resolved["num_inference_steps"],
        "ensemble": args.ensemble,
        "processing_resolution": resolved["processing_resolution"],
        "threshold": resolved["mask_threshold"],
        "background_threshold": resolved["background_threshold"],
        "seed": args.seed,
        "device": str(pipe.device),
    }


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def command_segment(args: argparse.Namespace) -> dict:
    prompts = [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise CLIError("--prompt must not be empty")
    dataset_inputs = args.input_dir or args.input_list or args.dataset
    if dataset_inputs and args.images:
        raise CLIError("give either IMAGE files or one of --input_dir / --input_list / --dataset, not both")
    if not dataset_inputs and not args.images:
        raise CLIError("give IMAGE files, or one of --input_dir / --input_list / --dataset")
    if dataset_inputs:
        return command_segment_dataset(args, prompts)
    with lock_output_root(args.out):  # a second digseg writing into the same --out is refused, never interleaved
        return _segment_into(args, prompts, Path(args.out))


def _segment_into(args: argparse.Namespace, prompts: list[str], out_root: Path) -> dict:
    images = [read_image(path) for path in args.images]  # fail on a bad file before loading the model
    out_dirs = [out_root] if len(images) == 1 else [out_root / name for name in output_folder_names(args.images, out_root)]
    for folder in out_dirs:
        _check_writable(folder, args.out)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, args.adapter, args.device)
    load_seconds = time.perf_counter() - start
    results = []
    with _progress_bar(args, "digseg segment") as progress:
        for path, out_dir, image in zip(args.images, out_dirs, images):
            image_start = time.perf_counter()
            output = run_pipeline(pipe, image, prompts, args, progress)
            seconds = time.perf_counter() - image_start
            folder = ResultFolder(out_dir, source=str(Path(path).resolve()), image=str(path))
            folder.begin(_output_files(prompts))
            summary = write_outputs(folder, image, prompts, output)
            summary.update({"image": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]), "segment_seconds": seconds})
            folder.finish(summary)
            results.append({**summary, "output_dir": str(out_dir)})
    document = {
        "command": "segment",
        "settings": _inference_settings(pipe, args),
        "timings": {"load_model_seconds": load_seconds, "total_seconds": time.perf_counter() - start},
        "images": results,
    }
    if len(images) > 1:
        atomic_write_json(out_root / SUMMARY_NAME, document)
    return document


def command_segment_dataset(args: argparse.Namespace, prompts: list[str]) -> dict:
    """`segment --input_dir | --input_list | --dataset`: a thin layer over `batch_inference.DatasetRun`."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .batch_inference import BatchInferenceError, BatchOptions, DatasetRun, FolderSource, HFDatasetSource, ListSource

    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))  # gloo on CPUs
    try:
        if args.input_dir:
            source = FolderSource(args.input_dir)
        elif args.input_list:
            source = ListSource(args.input_list)
        else:
            source = HFDatasetSource(args.dataset)
        with DatasetRun(source, args.out, state) as run:  # the main process locks --out and lists the inputs
            device = args.device
            if device == "auto" or (device == "cuda" and state.device.type == "cuda"):
                device = str(state.device)  # under accelerate launch: each process on its own GPU
            pipe = load_pipeline(args.model, args.adapter, device)
            options = BatchOptions(
                prompts=prompts, batch_images=args.batch_images, seed=args.seed, label_png=args.label_png,
                output_format=args.format, pipeline_kwargs=_pipeline_kwargs(args), progress=not args.quiet,
            )  # fmt: skip
            summary = run.run(pipe, options, describe={"model": args.model, "adapter": args.adapter})
    except BatchInferenceError as error:
        raise CLIError(str(error)) from None
    return {"command": "segment-dataset", "is_main_process": state.is_main_process, "out": str(args.out), **summary}


def command_demo(args: argparse.Namespace) -> dict:
    from .synthetic import SHAPE_CLASSES, SPLIT_SEED_OFFSETS, generate_scene

    seed = SPLIT_SEED_OFFSETS["test"] + args.scene
    scene = generate_scene(seed, size=64)
    prompts = list(scene.class_names)
    absent = [name for name in SHAPE_CLASSES if name not in prompts]
    if absent and not args.no_absent_class:
        prompts.append(absent[int(np.random.default_rng(seed).integers(len(absent)))])

    with lock_output_root(args.out):
        start = time.perf_counter()
        pipe = load_pipeline(args.model, args.adapter, args.device)
        load_seconds = time.perf_counter() - start
        with _progress_bar(args, "digseg demo") as progress:
            segment_start = time.perf_counter()
            output = run_pipeline(pipe, scene.image, prompts, args, progress)
            segment_seconds = time.perf_counter() - segment_start
        folder = ResultFolder(Path(args.out), source=f"digseg demo scene {seed}", image=f"synthetic test scene {args.scene}")
        folder.begin(_output_files(prompts, ["ground_truth.png", "image.png", "panel.png"]))
        summary = write_outputs(folder, scene.image, prompts, output)
        summary.update(_write_demo_extras(folder, scene, prompts, output, seed))
        summary.update(
            {
                "settings": _inference_settings(pipe, args),
                "timings": {"load_model_seconds": load_seconds, "segment_seconds": segment_seconds},
            }
        )
        folder.finish(summary)
    return summary


def _write_demo_extras(folder: ResultFolder, scene, prompts: list[str], output, seed: int) -> dict:
    """The demo's ground truth, input and comparison panel, and its scores."""
    from PIL import Image

    from .evaluation import BACKGROUND_NAME, EvaluationAccumulator
    from .synthetic import SHAPE_CLASSES
    from .visualization import label_map_image

    # Ground truth in the prompts' label space (0 = background, k + 1 = prompt k), and the scene's IoU.
    truth = np.zeros_like(scene.label, dtype=np.int64)
    for k, name in enumerate(prompts):
        truth[scene.label == SHAPE_CLASSES.index(name) + 1] = k + 1
    folder.save_image("ground_truth.png", label_map_image(truth, len(prompts), "palette"))
    folder.save_image("image.png", Image.fromarray(scene.image))
    accumulator = EvaluationAccumulator(SHAPE_CLASSES, ignore_index=255, thresholds=())  # the benchmark's scoring
    accumulator.add(scene.validation_example().label, [SHAPE_CLASSES.index(p) for p in prompts], None, np.asarray(output.label_maps[0]))
    metrics = accumulator.compute()
    per_class = {name: metrics["per_class"][name]["iou"] for name in [BACKGROUND_NAME] + prompts}
    folder.save_image("panel.png", _panel(scene.image, truth, np.asarray(output.label_maps[0]), len(prompts)))
    return {
        "command": "demo",
        "scene_seed": seed,
        "classes_present": list(scene.class_names),
        "classes_absent_queried": [p for p in prompts if p not in scene.class_names],
        "iou": {name: (None if value != value else float(value)) for name, value in per_class.items()},
        "mIoU": float(metrics["mIoU"]),
        "pixel_accuracy": float(metrics["pixel_accuracy"]),
    }


def _panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, num_classes: int, scale: int = 4):
    """Image | ground truth | prediction side by side, enlarged (nearest) so 64 px scenes are easy to see."""
    from PIL import Image

    from .visualization import colorize_label_map

    tiles = [image, colorize_label_map(truth, num_classes, None), colorize_label_map(prediction, num_classes, None)]
    height, width = image.shape[:2]
    gap = 4
    panel = np.full((height * scale, 3 * width * scale + 2 * gap, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        big = np.asarray(Image.fromarray(tile).resize((width * scale, height * scale), Image.NEAREST))
        left = i * (width * scale + gap)
        panel[:, left : left + width * scale] = big
    return Image.fromarray(panel)


def _print_summary(document: dict) -> None:
    if document.get("command") == "demo":
        print(f"scene {document['scene_seed']}: classes {', '.join(document['classes_present'])}")
        for entry in document["prompts"]:
            iou = document["iou"].get(entry["prompt"])
            iou_text = f"IoU {iou:.3f}" if iou is not None else "absent (IoU undefined)"
            print(f"  {entry['prompt']:<12} area {entry['mask_area_fraction']:.3f}  {iou_text}")
        print(f"  mIoU (incl. background) {document['mIoU']:.3f}; {document['timings']['segment_seconds']:.2f} s")
        return
    if document.get("command") == "segment-dataset":
        if not document["is_main_process"]:
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
        return
    for image in document["images"]:
        areas = ", ".join(f"{e['prompt']} {e['mask_area_fraction']:.3f}" for e in image["prompts"])
        print(f"{image['image']}: {areas} -> {image['output_dir']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints its own one-line error and exits with 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        document = command_segment(args) if args.command == "segment" else command_demo(args)
    except CLIError as error:
        print(f"digseg: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("digseg: interrupted", file=sys.stderr)
        return 130
    _print_summary(document)
    if document.get("is_main_process", True):
        print(f"outputs written to {args.out}")
    return 0  # a dataset run that completes exits 0 even when some images failed: they are listed in its summary


if __name__ == "__main__":
    sys.exit(main())
