"""The `digseg` command line: segment images with text prompts, or run the embedded demo.

    digseg demo --out demo_out
    digseg segment photo.png --prompt circle --prompt star --out results/

A thin layer over `DiGSegPipeline`: it parses arguments, loads the model, runs the pipeline once per image
(images of different sizes never share a call) and writes what comes out: one mask PNG per prompt, the label
map (palette PNG: pixel value = label, 0 = background, k + 1 = prompt k), a coloured overlay and a JSON summary.
Every user error (unreadable image, missing model, bad argument) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EXIT_USAGE = 2

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
    segment.add_argument("images", nargs="+", metavar="IMAGE", help="Image files (PNG, JPEG, ...).")
    segment.add_argument("--prompt", "-p", action="append", required=True, help="A class name or phrase; repeat for several.")
    segment.add_argument("--out", "-o", required=True, help="Output folder (created if needed).")
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


def _unique_stems(paths: Sequence[str]) -> list[str]:
    stems, seen = [], {}
    for path in paths:
        stem = _safe_name(Path(path).stem)
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count + 1}")
    return stems


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


def write_outputs(out_dir: Path, image: np.ndarray, prompts: list[str], output, index: int = 0) -> dict:
    """Write the masks, label map and overlay of one image; return the per-prompt summary entries."""
    from PIL import Image

    from .visualization import label_colors, overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    masks = np.asarray(output.masks[index])
    probabilities = np.asarray(output.probabilities[index])
    label_map = np.asarray(output.label_maps[index])
    entries = []
    for k, prompt in enumerate(prompts):
        file_name = f"mask_{k:02d}_{_safe_name(prompt)}.png"
        Image.fromarray(masks[k].astype(np.uint8) * 255, mode="L").save(out_dir / file_name)
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
    palette_image = Image.fromarray(label_map.astype(np.uint8), mode="P")
    palette_image.putpalette(label_colors(len(prompts)).reshape(-1).tolist())
    palette_image.save(out_dir / "label_map.png")
    Image.fromarray(overlay(image, label_map, num_classes=len(prompts))).save(out_dir / "overlay.png")
    return {"prompts": entries, "background_area_fraction": float((label_map == 0).mean())}


def _write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _progress_bar(args: argparse.Namespace, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=0, desc=description, unit="U-Net call", disable=True if args.quiet else None, leave=False)


def _inference_settings(pipe, args: argparse.Namespace) -> dict:
    config = pipe.config
    threshold = args.threshold if args.threshold is not None else config.default_mask_threshold
    background = args.background_threshold
    if background is None:
        background = config.default_background_threshold if config.default_background_threshold is not None else threshold
    return {
        "model": args.model,
        "adapter": args.adapter,
        "steps": args.steps or config.default_denoising_steps,
        "ensemble": args.ensemble,
        "processing_resolution": args.resolution if args.resolution is not None else config.default_processing_resolution,
        "threshold": threshold,
        "background_threshold": background,
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
    images = [read_image(path) for path in args.images]  # fail on a bad file before loading the model
    out_root = Path(args.out)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, args.adapter, args.device)
    load_seconds = time.perf_counter() - start
    stems = _unique_stems(args.images)
    results = []
    with _progress_bar(args, "digseg segment") as progress:
        for path, stem, image in zip(args.images, stems, images):
            image_start = time.perf_counter()
            output = run_pipeline(pipe, image, prompts, args, progress)
            seconds = time.perf_counter() - image_start
            out_dir = out_root if len(images) == 1 else out_root / stem
            summary = write_outputs(out_dir, image, prompts, output)
            summary.update({"image": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]), "segment_seconds": seconds})
            _write_json(out_dir / "summary.json", summary)
            results.append({**summary, "output_dir": str(out_dir)})
    document = {
        "command": "segment",
        "settings": _inference_settings(pipe, args),
        "timings": {"load_model_seconds": load_seconds, "total_seconds": time.perf_counter() - start},
        "images": results,
    }
    if len(images) > 1:
        _write_json(out_root / "summary.json", document)
    return document


def command_demo(args: argparse.Namespace) -> dict:
    from PIL import Image

    from .metrics import ConfusionMatrix
    from .synthetic import SHAPE_CLASSES, SPLIT_SEED_OFFSETS, generate_scene
    from .visualization import label_colors

    seed = SPLIT_SEED_OFFSETS["test"] + args.scene
    scene = generate_scene(seed, size=64)
    prompts = list(scene.class_names)
    absent = [name for name in SHAPE_CLASSES if name not in prompts]
    if absent and not args.no_absent_class:
        prompts.append(absent[int(np.random.default_rng(seed).integers(len(absent)))])

    out_dir = Path(args.out)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, args.adapter, args.device)
    load_seconds = time.perf_counter() - start
    with _progress_bar(args, "digseg demo") as progress:
        segment_start = time.perf_counter()
        output = run_pipeline(pipe, scene.image, prompts, args, progress)
        segment_seconds = time.perf_counter() - segment_start
    summary = write_outputs(out_dir, scene.image, prompts, output)

    # Ground truth in the prompts' label space (0 = background, k + 1 = prompt k), and the scene's IoU.
    truth = np.zeros_like(scene.label, dtype=np.int64)
    for k, name in enumerate(prompts):
        truth[scene.label == SHAPE_CLASSES.index(name) + 1] = k + 1
    ground_truth = Image.fromarray(truth.astype(np.uint8), mode="P")
    ground_truth.putpalette(label_colors(len(prompts)).reshape(-1).tolist())
    ground_truth.save(out_dir / "ground_truth.png")
    Image.fromarray(scene.image).save(out_dir / "image.png")
    confusion = ConfusionMatrix(len(prompts) + 1, class_names=["background"] + prompts)
    confusion.update(np.asarray(output.label_maps[0]).astype(np.int64), truth)
    metrics = confusion.compute()
    per_class = dict(zip(["background"] + prompts, metrics["per_class_iou"]))
    _write_panel(out_dir / "panel.png", scene.image, truth, np.asarray(output.label_maps[0]), len(prompts))

    summary.update(
        {
            "command": "demo",
            "scene_seed": seed,
            "classes_present": list(scene.class_names),
            "classes_absent_queried": [p for p in prompts if p not in scene.class_names],
            "iou": {name: (None if value != value else float(value)) for name, value in per_class.items()},
            "mIoU": float(metrics["mIoU"]),
            "pixel_accuracy": float(metrics["pixel_accuracy"]),
            "settings": _inference_settings(pipe, args),
            "timings": {"load_model_seconds": load_seconds, "segment_seconds": segment_seconds},
        }
    )
    _write_json(out_dir / "summary.json", summary)
    return summary


def _write_panel(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, num_classes: int, scale: int = 4) -> None:
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
    Image.fromarray(panel).save(path)


def _print_summary(document: dict) -> None:
    if document.get("command") == "demo":
        print(f"scene {document['scene_seed']}: classes {', '.join(document['classes_present'])}")
        for entry in document["prompts"]:
            iou = document["iou"].get(entry["prompt"])
            iou_text = f"IoU {iou:.3f}" if iou is not None else "absent (IoU undefined)"
            print(f"  {entry['prompt']:<12} area {entry['mask_area_fraction']:.3f}  {iou_text}")
        print(f"  mIoU (incl. background) {document['mIoU']:.3f}; {document['timings']['segment_seconds']:.2f} s")
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
    print(f"outputs written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
