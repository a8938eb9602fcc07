"""Segment a whole dataset: any number of processes and machines (accelerate), resumable, standard outputs.

    accelerate launch --multi_gpu --num_processes 8 -m digseg_diffusers.inference.cli segment \
        --input_dir photos/ --prompt person --prompt car --out results/ --batch_images 8 --format coco

The main process locks OUT, lists the inputs and broadcasts the list; each process takes its contiguous share,
groups images of the same size into calls of up to `batch_images`, and writes per image, atomically,
``OUT/<name>.png`` (label map: 0 = background, k + 1 = prompt k; palette PNG, 16-bit beyond 255 prompts) and then
``OUT/<name>.json`` (segments with score, area, bbox and, with ``coco``, COCO RLE; ``"status": "complete"``).
A complete result for the same input and settings is skipped, so a killed run resumes with any number of processes;
an unreadable image, or one the pipeline refuses, is listed in ``OUT/digseg_summary.json``, never fatal. Nothing
else is overwritten: OUT must be new, empty or a folder of earlier results (``digseg_run.json``, the settings), and
other settings are refused, unless ``--overwrite``. The command line's IMAGE files run through the same engine
(`PathsSource`, `MasksAndOverlay`). Output names mirror the input's relative path (`output_names`); dataset rows
are named by split and index (``train/00000042``).
With ``coco`` the processes' part files are merged into ``OUT/annotations_coco.json`` (pycocotools' format).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from digseg_diffusers.atomic_io import (
    TEMPORARY_SUFFIX,
    DirectoryLock,
    FolderLockedError,
    atomic_file,
    atomic_write_json,
    is_disk_full,
    remove_directory,
)
from digseg_diffusers.inference.visualization import LABEL_PNG_ENCODINGS, label_map_image, overlay

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
RUN_RECORD_NAME = "digseg_run.json"
SUMMARY_NAME = "digseg_summary.json"
COCO_NAME = "annotations_coco.json"
PARTS_DIR = ".digseg_parts"
LOCK_NAME = ".digseg.lock"
RESERVED_NAMES = (RUN_RECORD_NAME, SUMMARY_NAME, COCO_NAME, LOCK_NAME, PARTS_DIR)
OUTPUT_FORMATS = ("png", "coco")
RESULT_FORMAT_VERSION = 2
LEFTOVER_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(TEMPORARY_SUFFIX) + "$")
"""What `atomic_io.atomic_file` names its temporary files: a killed run can leave them; the next run removes them."""


class BatchInferenceError(Exception):
    """A user-facing error of a dataset run (bad input list, unusable OUT, settings differing from OUT's)."""


def error_summary(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none): one-line errors and failure lists."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One input: `key` names its outputs (a relative POSIX path), `source` is what `ImageSource.open` reads."""

    key: str
    source: str


class ImageSource:
    """A list of inputs and the way to open one; `items` runs on the main process only, `open` everywhere."""

    def items(self, exclude: Path | None = None) -> list[InputItem]:
        raise NotImplementedError

    def open(self, item: InputItem):
        """The item's image (a PIL image), or `ValueError` with the reason it cannot be read."""
        from digseg_diffusers.image_processing import open_image

        return open_image(item.source)

    def same_input(self, document: dict, item: InputItem) -> bool:
        """Does an earlier result document belong to this input? (Its key names the input.)"""
        return document.get("source") == item.key

    def check_outputs(self, out: Path, items: Sequence[InputItem], names: Sequence[str]) -> None:
        """Raise `BatchInferenceError` if writing these outputs would replace results that are not these inputs'."""


class FolderSource(ImageSource):
    """Every image file (by extension, case-insensitive) under a folder, recursively, in sorted order; hidden
    files and folders and the output folder are left out."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BatchInferenceError(f"--input_dir {root} is not a folder")

    def items(self, exclude: Path | None = None) -> list[InputItem]:
        excluded = exclude.resolve() if exclude is not None else None
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(folder, d).resolve() != excluded)
            for name in files:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    path = Path(folder, name)
                    found.append(InputItem(path.relative_to(self.root).as_posix(), str(path)))
        return sorted(found, key=lambda item: item.key)


def _key_of_path(entry: str) -> str:
    """The output key of a path as written: relative paths as they are ('..' -> '__'), absolute ones by the whole
    path ('/data/x/a.png' -> 'data/x/a.png'; 'C:' -> 'C_')."""
    parts = [("__" if part == ".." else part) for part in PurePosixPath(Path(entry).as_posix()).parts if part not in ("/", ".")]
    return "/".join(part.replace(":", "_") for part in parts)


class ListSource(ImageSource):
    """Image paths from a text file, one per line (blank lines and lines starting with '#' ignored). Relative
    paths are relative to the list file's folder and name their outputs as written; absolute paths (and ones
    with '..') name theirs by the whole path ('/data/x/a.png' -> 'data/x/a'). Repeated entries count once."""

    def __init__(self, list_file: str | os.PathLike):
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise BatchInferenceError(f"--input_list {list_file} is not a file")

    def items(self, exclude: Path | None = None) -> list[InputItem]:
        base = self.list_file.resolve().parent
        try:
            lines = self.list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise BatchInferenceError(f"cannot read --input_list {self.list_file}: {error}") from None
        items: dict[str, InputItem] = {}
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            path = Path(entry) if os.path.isabs(entry) else base / entry
            key = _key_of_path(entry)
            items.setdefault(key.casefold(), InputItem(key, str(path)))
        return list(items.values())


class PathsSource(ImageSource):
    """Image files named one by one (the command line's IMAGE arguments), keyed by their path relative to the
    folder that holds them all (``x/a.png y/a.png`` -> ``OUT/x/a.*``, ``OUT/y/a.*``). The user named them, so one
    that cannot be read stops the run before the model loads; as the key does not say which folder a file came
    from, a result is this input's only if it names the same file, and another file's results are never replaced.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [os.fspath(path) for path in paths]

    def items(self, exclude: Path | None = None) -> list[InputItem]:
        from digseg_diffusers.image_processing import open_image

        for entry in self.paths:
            try:
                with open_image(entry):
                    pass
            except ValueError as error:
                raise BatchInferenceError(str(error)) from None
        files = list(dict.fromkeys(Path(entry).resolve() for entry in self.paths))
        try:
            base = Path(os.path.commonpath([file.parent for file in files]))
            keys = [file.relative_to(base).as_posix() for file in files]
        except ValueError:  # different drives
            keys = [_key_of_path(str(file)) for file in files]
        return [InputItem(key, str(file)) for key, file in zip(keys, files)]

    def same_input(self, document: dict, item: InputItem) -> bool:
        return super().same_input(document, item) and document.get("image") == item.source

    def check_outputs(self, out: Path, items: Sequence[InputItem], names: Sequence[str]) -> None:
        for item, name in zip(items, names):
            earlier = read_json(out / f"{name}.json")
            if earlier is not None and earlier.get("image") not in (None, item.source):
                raise BatchInferenceError(
                    f"--out {out} holds the results of another image named {item.key} ({earlier.get('image')}); "
                    "choose another --out, or pass --overwrite to replace them"
                )


class HFDatasetSource(ImageSource):
    """Rows of a Hugging Face dataset, ``NAME[:SPLIT]`` (a Hub id, a local data folder or a `save_to_disk`
    folder; split default "train"); the image is the first column of type `datasets.Image` (else "image")."""

    def __init__(self, spec: str):
        try:
            import datasets  # noqa: F401  (an optional dependency)
        except ImportError:
            raise BatchInferenceError("--dataset needs the `datasets` package: pip install datasets") from None
        name, _, split = spec.partition(":")
        if os.path.exists(spec) and not os.path.exists(name):  # a local path with ':' in it
            name, split = spec, ""
        self.name, self.split = name, split or "train"
        self._dataset = None
        self._column: str | None = None

    def _load(self):
        if self._dataset is None:
            import datasets

            try:
                if os.path.isdir(self.name) and any(
                    os.path.isfile(os.path.join(self.name, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")
                ):
                    loaded = datasets.load_from_disk(self.name)
                    dataset = loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
                else:
                    dataset = datasets.load_dataset(self.name, split=self.split)
            except Exception as error:  # missing dataset or split, no network, bad folder: all mean "cannot load"
                reason = error_summary(error)
                raise BatchInferenceError(f"cannot load --dataset {self.name}:{self.split}: {reason}") from None
            columns = [k for k, v in dataset.features.items() if isinstance(v, datasets.Image)]
            self._column = columns[0] if columns else ("image" if "image" in dataset.column_names else None)
            if self._column is None:
                raise BatchInferenceError(f"--dataset {self.name}: no image column among {dataset.column_names}")
            self._dataset = dataset
        return self._dataset

    def items(self, exclude: Path | None = None) -> list[InputItem]:
        count = len(self._load())
        digits = max(8, len(str(count - 1)))
        return [InputItem(f"{self.split}/{i:0{digits}d}", str(i)) for i in range(count)]

    def open(self, item: InputItem):
        try:
            image = self._load()[int(item.source)][self._column]
            if isinstance(image, Image.Image):
                image.load()
                return image
            if isinstance(image, str):
                from digseg_diffusers.image_processing import open_image

                return open_image(image)
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise ValueError(f"cannot read row {item.source}: {error_summary(error)}") from None
        raise ValueError(f"row {item.source}: column {self._column!r} holds a {type(image).__name__}, not an image")


def output_names(keys: Sequence[str], extra_suffixes: Sequence[str] = ()) -> list[str]:
    """Per input key, the relative path NAME of its outputs (``NAME.png``, ``NAME.json``, ``NAME + suffix`` for each
    of `extra_suffixes`), so that no output of one input ever overwrites another's: the key without its extension,
    unless a path would (case-insensitively) be another input's, lie inside one or be one of the run's own files;
    such inputs keep their extension (``a.png``, ``a.jpg`` -> ``a.png.png``, ``a.jpg.png``), then add a hash."""
    reserved = {name.casefold() for name in RESERVED_NAMES}

    def candidate(key: str, level: int) -> str:
        stem = str(PurePosixPath(key).with_suffix("")) if PurePosixPath(key).suffix else key
        return (stem, key, f"{key}~{hashlib.sha1(key.encode('utf-8')).hexdigest()[:8]}")[level]

    def paths_of(name: str) -> list[str]:
        return [path.casefold() for path in (f"{name}.png", f"{name}.json", *(name + suffix for suffix in extra_suffixes))]

    levels = [0] * len(keys)
    while True:
        names = [candidate(key, level) for key, level in zip(keys, levels)]
        owners: dict[str, set[int]] = {}
        for i, name in enumerate(names):
            for path in paths_of(name):
                owners.setdefault(path, set()).add(i)
        clashing = set()
        for path, holders in owners.items():
            if len(holders) > 1 or path in reserved:
                clashing |= holders
            parts = path.split("/")
            for depth in range(1, len(parts)):  # a path inside another input's output (e.g. its masks folder)
                outer = owners.get("/".join(parts[:depth]))
                if outer is not None and outer != holders:
                    clashing |= holders | outer
        clashing = {i for i in clashing if levels[i] < 2}
        if not clashing:
            return names
        for i in clashing:
            levels[i] += 1


# ----------------------------------------------------------------------------------------------------------------
# Per-image results
# ----------------------------------------------------------------------------------------------------------------


def settings_fingerprint(settings: dict) -> str:
    """A short id of a run's settings, stored in each result: a result counts as done only for the same settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    """A JSON object file's content; None when it is missing, unreadable or not an object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def read_result(out: Path, name: str, item: InputItem, source: ImageSource, settings_id: str) -> dict | None:
    """The complete result document of `item` under `out` made with the settings `settings_id`, or None when it
    must be (re)computed."""
    document = read_json(out / f"{name}.json")
    if document is None or document.get("status") != "complete" or document.get("settings_id") != settings_id:
        return None
    if not source.same_input(document, item):
        return None
    extras = document.get("files", [])
    files = [document.get("label_map", ""), *(extras if isinstance(extras, list) else [None])]
    return document if all(isinstance(f, str) and f and (out / f).is_file() for f in files) else None


def check_output_format(output_format: str) -> None:
    """Refuse an unknown format, and ``coco`` without pycocotools (the ``coco`` extra), before any work."""
    if output_format not in OUTPUT_FORMATS:
        raise BatchInferenceError(f"--format must be one of {OUTPUT_FORMATS}; got {output_format!r}")
    if output_format == "coco" and importlib.util.find_spec("pycocotools") is None:
        raise BatchInferenceError(
            "--format coco writes COCO RLE masks with pycocotools, which is not installed: pip install pycocotools "
            '(or pip install -e ".[coco]")'
        )


def coco_rle(mask: np.ndarray) -> dict:
    """A binary mask as COCO's compressed RLE (``{"size": [h, w], "counts": str}``), as `pycocotools.mask.encode`
    writes it; ``pycocotools.coco.COCO(...).annToMask`` reads it back."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(size) for size in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO bounding box ``[x, y, width, height]`` of a binary mask (all zeros for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def segment_records(output, index: int, rle: bool) -> list[dict]:
    """`DiGSegOutput.to_segments` of image `index` as JSON-ready records: label, label_id (k + 1), score, area,
    bbox, and with `rle` the mask as COCO RLE."""
    prompts = list(output.prompts[index])
    records = []
    for segment in output.to_segments(index, mask_format="np"):
        mask = segment.pop("mask")
        segment.update({"label_id": prompts.index(segment["label"]) + 1, "area": int(mask.sum()), "bbox": mask_bbox(mask)})
        if rle:
            segment["segmentation"] = coco_rle(mask)
        records.append(segment)
    return records


def row_generators(num_images: int, num_prompts: int, seed: int, ensemble_size: int = 1) -> list:
    """One generator per pipeline row: row r of every image (prompt-major, then ensemble member) draws its noise
    from ``seed + r``, so an image's result never depends on the batch or the process it landed in."""
    import torch

    rows = num_prompts * ensemble_size
    return [torch.Generator().manual_seed(seed + r) for _ in range(num_images) for r in range(rows)]


def save_png(path: Path, image) -> None:
    """Write a PIL image as PNG, atomically (the format is named: the temporary file ends in ".tmp")."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return name[:60] or "prompt"


def mask_file_name(k: int, prompt: str, num_prompts: int) -> str:
    """``mask_<k>_<prompt>.png``: k zero-padded (at least 2 digits) so that the files sort in prompt order."""
    return f"mask_{k:0{max(2, len(str(num_prompts - 1)))}d}_{_safe_name(prompt)}.png"


def write_masks_and_overlay(out: Path, masks_folder: str, overlay_file: str, output, index: int, image) -> dict:
    """One mask PNG per prompt (255 = inside) in `masks_folder` and the coloured overlay, for people to look at.
    Returns the result JSON's entries: the files and, per prompt, the fraction of the image its mask covers, the
    fraction the label map gives it (masks overlap, the label map does not) and its largest probability."""
    prompts = list(output.prompts[index])
    masks, label_map = np.asarray(output.masks[index]), np.asarray(output.label_maps[index])
    probabilities = np.asarray(output.probabilities[index])
    files = [str(PurePosixPath(masks_folder, mask_file_name(k, p, len(prompts)))) for k, p in enumerate(prompts)]
    (out / masks_folder).mkdir(parents=True, exist_ok=True)
    for k, file in enumerate(files):
        save_png(out / file, Image.fromarray(masks[k].astype(np.uint8) * 255, mode="L"))
    save_png(out / overlay_file, Image.fromarray(overlay(image, label_map, num_classes=len(prompts))))
    entries = [
        {
            "prompt": prompt,
            "label": k + 1,
            "mask_file": file,
            "mask_area_fraction": float(masks[k].mean()),
            "label_area_fraction": float((label_map == k + 1).mean()),
            "max_probability": float(probabilities[k].max()),
        }
        for k, (prompt, file) in enumerate(zip(prompts, files))
    ]
    return {"files": [*files, overlay_file], "overlay": overlay_file, "prompts": entries,
            "background_area_fraction": float((label_map == 0).mean())}  # fmt: skip


def segment_images(pipe, images: list, prompts: Sequence[str], seed: int, pipeline_kwargs: dict):
    """One pipeline call over same-size images; each row's noise comes from `row_generators`, so a result never
    depends on the batch or the process its image landed in."""
    generators = row_generators(len(images), len(prompts), seed, pipeline_kwargs.get("ensemble_size", 1))
    return pipe(images, list(prompts), output_type="np", generator=generators, **pipeline_kwargs)


class MasksAndOverlay:
    """Per-image extras of the command line's IMAGE mode: ``NAME.masks/`` and ``NAME.overlay.png``."""

    suffixes = (".overlay.png", ".masks")
    description = "label map, masks, overlay"

    def write(self, out: Path, name: str, output, index: int, pixels) -> dict:
        return write_masks_and_overlay(out, f"{name}.masks", f"{name}.overlay.png", output, index, pixels)


def write_result(
    out: Path, name: str, item: InputItem, output, index: int, label_png: str, coco: bool, extra: dict,
    extras: MasksAndOverlay | None = None, pixels=None,
) -> dict:  # fmt: skip
    """Write one image's label-map PNG (and `extras`' files), then its JSON (last: its presence means the result is
    complete). Files that an earlier result of this input listed and this one does not (masks of other prompts,
    after ``--overwrite``) are removed once the new JSON is in place: they were this input's own outputs."""
    prompts = list(output.prompts[index])
    label_map = np.asarray(output.label_maps[index])
    label_file = Path(f"{name}.png")
    (out / label_file).parent.mkdir(parents=True, exist_ok=True)
    earlier = read_json(out / f"{name}.json") or {}
    if earlier:  # being replaced (other settings, --overwrite): never "complete" over files that are half new
        atomic_write_json(out / f"{name}.json", {"status": "incomplete", "source": item.key, "files": earlier.get("files", [])})
    save_png(out / label_file, label_map_image(label_map, len(prompts), label_png))
    document = {
        "status": "complete",
        "format_version": RESULT_FORMAT_VERSION,
        "source": item.key,
        "image": item.source,
        "height": int(label_map.shape[0]),
        "width": int(label_map.shape[1]),
        "label_map": label_file.as_posix(),
        "labels": ["background", *prompts],
        "segments": segment_records(output, index, coco),
        **extra,
    }
    if extras is not None:
        document.update(extras.write(out, name, output, index, pixels))
    atomic_write_json(out / f"{name}.json", document)
    own_paths = {f"{name}{suffix}" for suffix in (extras.suffixes if extras is not None else ())}
    earlier_files = earlier.get("files") if isinstance(earlier.get("files"), list) else []
    for stale in {f for f in earlier_files if isinstance(f, str)} - set(document.get("files", [])):
        if any(stale == p or stale.startswith(p + "/") for p in own_paths):
            (out / stale).unlink(missing_ok=True)
    return document


def coco_records(document: dict, image_id: int) -> dict:
    """One result document as a COCO image entry and its annotations (ids of annotations set at merge time)."""
    image = {"id": image_id, "file_name": document["source"], "height": document["height"], "width": document["width"]}
    annotations = [
        {
            "image_id": image_id,
            "category_id": segment["label_id"],
            "segmentation": segment["segmentation"],
            "area": segment["area"],
            "bbox": segment["bbox"],
            "iscrowd": 0,
            "score": segment["score"],
        }
        for segment in document["segments"]
    ]
    return {"image": image, "annotations": annotations}


def merge_coco_parts(parts: Sequence[Path], destination: Path, prompts: Sequence[str]) -> dict:
    """Stream the processes' part files (JSON lines of `coco_records`) into one COCO annotations file."""
    counts = {"images": 0, "annotations": 0}
    categories = [{"id": k + 1, "name": prompt, "supercategory": "prompt"} for k, prompt in enumerate(prompts)]

    def records():
        for part in parts:
            with open(part, encoding="utf-8") as lines:
                yield from map(json.loads, lines)

    with atomic_file(destination) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write('{"info": {"description": "DiGSeg predictions", "version": "1.0"}, "licenses": [], ')
        handle.write(f'"categories": {json.dumps(categories)}')
        for section in ("images", "annotations"):  # two passes: the file is never held in memory
            handle.write(f',\n"{section}": [')
            for record in records():
                for entry in [record["image"]] if section == "images" else record["annotations"]:
                    if section == "annotations":
                        entry = {"id": counts[section] + 1, **entry}
                    handle.write(("\n" if counts[section] == 0 else ",\n") + json.dumps(entry))
                    counts[section] += 1
            handle.write("]")
        handle.write("}\n")
    return counts


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def resolved_settings(pipe, pipeline_kwargs: dict) -> dict:
    """The pipeline settings a result depends on, with the model's defaults filled in (for summaries and resume)."""
    kwargs = pipeline_kwargs
    resolved = pipe.resolve_call_defaults(
        kwargs.get("num_inference_steps"), kwargs.get("processing_resolution"),
        kwargs.get("mask_threshold"), kwargs.get("background_threshold"),
    )  # fmt: skip
    return {
        "steps": resolved["num_inference_steps"],
        "ensemble": kwargs.get("ensemble_size", 1),
        "processing_resolution": resolved["processing_resolution"],
        "threshold": resolved["mask_threshold"],
        "background_threshold": resolved["background_threshold"],
    }


@dataclass
class BatchOptions:
    """What to compute per image. `pipeline_kwargs` go to every pipeline call (num_inference_steps,
    ensemble_size, processing_resolution, mask_threshold, background_threshold, batch_size)."""

    prompts: list[str]
    batch_images: int = 1
    seed: int = 0
    label_png: str = "auto"
    output_format: str = "png"
    pipeline_kwargs: dict = field(default_factory=dict)
    progress: bool = True
    window: int = 0
    """Images read ahead to find same-size batches (default: 4 x batch_images)."""
    extras: MasksAndOverlay | None = None
    """Per-image files written next to the label map (the command line's IMAGE mode: masks and overlay)."""

    def __post_init__(self) -> None:
        """Refuse bad options when they are made: before the model loads and before any image."""
        check_output_format(self.output_format)
        if self.label_png not in LABEL_PNG_ENCODINGS:
            raise BatchInferenceError(f"--label_png must be one of {LABEL_PNG_ENCODINGS}; got {self.label_png!r}")
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise BatchInferenceError(f"prompts must be non-empty strings; got {self.prompts!r}")
        if self.label_png == "palette" and len(self.prompts) > 255:
            raise BatchInferenceError(
                f"a palette PNG holds 255 labels; {len(self.prompts)} prompts need --label_png 16bit (or auto)"
            )


def _broadcast_from_main(state, compute: Callable[[], object]):
    """Run `compute` on the main process and hand its result (or its `BatchInferenceError`) to every process."""
    from accelerate.utils import broadcast_object_list

    box = [None]
    if state.is_main_process:
        try:
            box = [("ok", compute())]
        except BatchInferenceError as error:
            box = [("error", str(error))]
    status, value = broadcast_object_list(box, from_process=0)[0]
    if status == "error":
        raise BatchInferenceError(value)
    return value


def remove_leftover_temporaries(out: Path) -> None:
    """Delete the hidden temporary files (`LEFTOVER_TEMPORARY`) that killed runs left under `out`: never read,
    always incomplete. Called with OUT locked, so no live writer owns them."""
    for folder, _, files in os.walk(out):
        for name in filter(LEFTOVER_TEMPORARY.match, files):
            Path(folder, name).unlink(missing_ok=True)


def lock_output_folder(out: Path) -> DirectoryLock:
    """Create and lock OUT before any model work (one writer per OUT), or raise `BatchInferenceError` saying why it
    cannot be used; the refusal names the process that holds it."""
    if out.exists() and not out.is_dir():
        raise BatchInferenceError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return DirectoryLock(out, LOCK_NAME).acquire()  # creating the lock file also proves the folder writable
    except FolderLockedError as error:
        raise BatchInferenceError(f"--out {out}: {error}; wait for it to finish or choose another --out") from None
    except OSError as error:
        if is_disk_full(error):
            raise BatchInferenceError(
                f"--out {out}: the disk is full ({error.strerror}); free some space or choose an --out on another disk"
            ) from None
        raise BatchInferenceError(f"--out {out} is not a writable folder: {error.strerror or error}") from None


def foreign_entries(out: Path) -> list[str]:
    """The sorted names at the top of OUT other than the lock, COCO part files and leftover temporaries."""
    if not out.is_dir():
        return []
    ours = (LOCK_NAME, PARTS_DIR)
    return sorted(p.name for p in out.iterdir() if p.name not in ours and not LEFTOVER_TEMPORARY.match(p.name))


class DatasetRun:
    """One dataset run into `out`: `open` (main process: lock OUT, list the inputs; every process gets the
    list) before the model loads, then `run` with the pipeline; use as a context manager (releases the lock)."""

    def __init__(self, source: ImageSource, out: str | os.PathLike, state=None, overwrite: bool = False):
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        self.source, self.out, self.overwrite = source, Path(out), overwrite
        # ACCELERATE_USE_CPU=1 + `accelerate launch --multi_gpu`: CPU processes that talk over gloo.
        self.state = state if state is not None else PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        self._lock: DirectoryLock | None = None
        self.settings_used: dict = {}
        self._outside_vocabulary: list[str] = []
        self.items: list[InputItem] = []
        self.names: list[str] = []

    def open(self) -> DatasetRun:
        try:
            self.items = _broadcast_from_main(self.state, self._lock_and_list)
        except BaseException:
            self.close()  # e.g. no inputs: --out is free again at once
            raise
        return self

    def _lock_and_list(self) -> list[InputItem]:
        self._lock = lock_output_folder(self.out)
        ours = (self.out / RUN_RECORD_NAME).is_file()
        if not ours and not self.overwrite:
            self._refuse_other_content()
        if ours:
            remove_leftover_temporaries(self.out)
        items = self.source.items(exclude=self.out)
        if not items:
            raise BatchInferenceError("no input images found")
        remove_directory(self.out / PARTS_DIR)  # parts of a killed run; every part is rebuilt from the results
        return items

    def _refuse_other_content(self) -> None:
        """OUT must be new, empty, or a folder of earlier digseg results: never someone's own files."""
        others = foreign_entries(self.out)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise BatchInferenceError(
                f"--out {self.out} already holds files that are not digseg results ({shown}); choose another --out, "
                "or pass --overwrite to write into it (files named like this run's outputs are replaced)"
            )

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> DatasetRun:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def settings(self, pipe, options: BatchOptions, describe: dict) -> dict:
        """What the results depend on (written to and checked against ``OUT/digseg_run.json``)."""
        return {
            **describe,
            "prompts": list(options.prompts),
            **resolved_settings(pipe, options.pipeline_kwargs),
            "seed": options.seed,
            "label_png": options.label_png,
            "format": options.output_format,
            "outputs": options.extras.description if options.extras is not None else "label map",
        }

    def _check_settings(self, settings: dict) -> None:
        path = self.out / RUN_RECORD_NAME
        if path.is_file() and not self.overwrite:
            record = read_json(path)
            earlier = record.get("settings", {}) if record is not None else None
            differing = sorted(k for k in set(settings) | set(earlier or {}) if (earlier or {}).get(k) != settings.get(k))
            if earlier is None or differing:
                what = ", ".join(differing) if earlier is not None else f"unreadable {RUN_RECORD_NAME}"
                raise BatchInferenceError(
                    f"--out {self.out} holds results made with other settings ({what}); use another --out, the "
                    "same settings to resume, or --overwrite to replace the results of this run's inputs"
                )
        atomic_write_json(path, {"settings": settings})

    def run(self, pipe, options: BatchOptions, describe: dict | None = None, on_image_done: Callable[[dict], None] | None = None) -> dict:
        """Segment this process's share; return the run's summary (the same on every process).

        `on_image_done` is called on this process as each of its images is done, with ``{"key", "image", "status"
        ("segmented", "skipped": complete from an earlier run, or "failed"), "document" (the result JSON) or
        "reason"}``."""
        from accelerate.utils import gather_object

        settings = self.settings(pipe, options, describe or {})
        self.settings_used = settings
        suffixes = options.extras.suffixes if options.extras is not None else ()
        self.names = output_names([item.key for item in self.items], suffixes)
        if not self.overwrite:
            _broadcast_from_main(self.state, lambda: self.source.check_outputs(self.out, self.items, self.names))
        _broadcast_from_main(self.state, lambda: self._check_settings(settings))
        state = self.state
        with state.split_between_processes(list(range(len(self.items)))) as positions:
            positions = list(positions)
        stats = _Shard(self, pipe, options, positions, on_image_done).run()
        state.wait_for_everyone()
        all_stats = gather_object([stats])
        check = getattr(pipe, "prompts_outside_vocabulary", None)
        self._outside_vocabulary = check(list(options.prompts)) if check is not None else []
        summary = _broadcast_from_main(state, lambda: self._finish(all_stats, settings, options))
        state.wait_for_everyone()
        return summary

    def _finish(self, all_stats: list[dict], settings: dict, options: BatchOptions) -> dict:
        all_stats = sorted(all_stats, key=lambda s: s["process_index"])
        failures = sorted((f for s in all_stats for f in s.pop("failures")), key=lambda f: f["image"])
        coco = None
        if options.output_format == "coco":
            parts = [self.out / PARTS_DIR / _part_name(s["process_index"], len(all_stats)) for s in all_stats]
            counts = merge_coco_parts(parts, self.out / COCO_NAME, options.prompts)
            remove_directory(self.out / PARTS_DIR)
            coco = {"file": COCO_NAME, **counts}
        segmented = sum(s["segmented"] for s in all_stats)
        slowest = max(s["seconds"] for s in all_stats)
        summary = {
            "images": len(self.items),
            "segmented": segmented,
            "skipped_complete": sum(s["skipped"] for s in all_stats),
            "failed": len(failures),
            "failures": failures,
            "num_processes": len(all_stats),
            "seconds": slowest,
            "images_per_second": segmented / slowest if slowest > 0 else 0.0,
            "per_process": all_stats,
            "coco": coco,
            "settings": settings,
            "prompts_outside_training_vocabulary": self._outside_vocabulary,
        }
        atomic_write_json(self.out / SUMMARY_NAME, summary)
        return summary


def _part_name(rank: int, world: int) -> str:
    return f"coco-{rank:05d}-of-{world:05d}.jsonl"


class _Shard:
    """One process's share: skip complete results, read, batch same-size images, segment, write."""

    def __init__(self, run: DatasetRun, pipe, options: BatchOptions, positions: list[int], on_image_done):
        self.run_, self.pipe, self.options, self.positions = run, pipe, options, positions
        self.on_image_done = on_image_done
        self.stats = {
            "process_index": run.state.process_index, "images": len(positions), "segmented": 0, "skipped": 0,
            "failed": 0, "seconds": 0.0, "images_per_second": 0.0, "failures": [],
        }  # fmt: skip
        self.coco = options.output_format == "coco"
        self.settings_id = settings_fingerprint(run.settings_used)
        self._part = None
        self._bar = None
        self._done: dict[int, dict | None] = {}
        self._next = 0

    def run(self) -> dict:
        from tqdm.auto import tqdm

        state = self.run_.state
        start = time.perf_counter()
        description = "digseg segment" + (f" (process 0 of {state.num_processes}: its share)" if state.num_processes > 1 else "")
        shown = state.is_main_process and self.options.progress
        with tqdm(total=len(self.positions), desc=description, unit="img", disable=not shown) as self._bar:
            if self.coco:
                part = self.run_.out / PARTS_DIR / _part_name(state.process_index, state.num_processes)
                part.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(part) as tmp, open(tmp, "w", encoding="utf-8") as self._part:
                    self._segment_all()
            else:
                self._segment_all()
        seconds = time.perf_counter() - start
        self.stats.update(seconds=seconds, images_per_second=self.stats["segmented"] / seconds if seconds > 0 else 0.0)
        return self.stats

    def _segment_all(self) -> None:
        from digseg_diffusers.image_processing import to_float_rgb

        run, options = self.run_, self.options
        batch_images = max(1, options.batch_images)
        window = max(options.window or 4 * batch_images, batch_images)
        pending: dict[tuple[int, int], list] = {}
        for position in self.positions:
            item, name = run.items[position], run.names[position]
            document = read_result(run.out, name, item, run.source, self.settings_id)
            if document is not None:
                self.stats["skipped"] += 1
                self._record(position, document)
                self._announce(position, "skipped", document=document)
                continue
            try:
                with run.source.open(item) as image:
                    pixels = to_float_rgb(image)
            except ValueError as error:
                self._fail(position, str(error))
                continue
            group = pending.setdefault(tuple(pixels.shape[:2]), [])
            group.append((position, pixels))
            if len(group) >= batch_images:
                self._segment(pending.pop(tuple(pixels.shape[:2])))
            elif sum(len(g) for g in pending.values()) >= window:  # read ahead no further: run the largest group
                self._segment(pending.pop(max(pending, key=lambda size: len(pending[size]))))
        for size in list(pending):
            self._segment(pending.pop(size))

    def _segment(self, group: list) -> None:
        run = self.run_
        start = time.perf_counter()
        try:
            options = self.options
            images = [pixels for _, pixels in group]
            output = segment_images(self.pipe, images, options.prompts, options.seed, options.pipeline_kwargs)
        except (ValueError, RuntimeError) as error:  # the pipeline refused an image, or ran out of memory
            if len(group) > 1:
                for member in group:  # find which image it was
                    self._segment([member])
                return
            self._fail(group[0][0], error_summary(error))
            return
        seconds = (time.perf_counter() - start) / len(group)
        extra = {
            "settings_id": self.settings_id,
            "written_by": {"process_index": run.state.process_index, "num_processes": run.state.num_processes},
        }
        for index, (position, pixels) in enumerate(group):
            item = run.items[position]
            document = write_result(
                run.out, run.names[position], item, output, index, self.options.label_png, self.coco,
                {**extra, "segment_seconds": seconds}, self.options.extras, pixels,
            )  # fmt: skip
            self.stats["segmented"] += 1
            self._record(position, document)
            self._announce(position, "segmented", document=document)

    def _announce(self, position: int, status: str, document: dict | None = None, reason: str | None = None) -> None:
        if self.on_image_done is not None:
            item = self.run_.items[position]
            self.on_image_done({"key": item.key, "image": item.source, "name": self.run_.names[position],
                                "status": status, "document": document, "reason": reason})  # fmt: skip

    def _record(self, position: int, document: dict | None) -> None:
        """Note an image as done (None: failed). Part lines go out in input order, so the merged COCO file is the
        same for any batch size, number of processes or resume history."""
        self._bar.update()
        if self._part is None:
            return
        self._done[position] = None if document is None else coco_records(document, position + 1)
        while self._next < len(self.positions) and self.positions[self._next] in self._done:
            record = self._done.pop(self.positions[self._next])
            if record is not None:
                self._part.write(json.dumps(record) + "\n")
            self._next += 1

    def _fail(self, position: int, reason: str) -> None:
        self.stats["failed"] += 1
        self.stats["failures"].append({"image": self.run_.items[position].source, "reason": reason})
        self._bar.set_postfix(failed=self.stats["failed"], refresh=False)
        self._record(position, None)
        self._announce(position, "failed", reason=reason)


# ----------------------------------------------------------------------------------------------------------------
# Batches of arrays (Ray Data `map_batches`, `datasets.Dataset.map(batched=True)`)
# ----------------------------------------------------------------------------------------------------------------


class BatchSegmenter:
    """A callable over a batch ``{column: sequence}`` of decoded images, for engines that shard data themselves
    (Ray Data's ``map_batches``, ``datasets.Dataset.map(batched=True)``): adds ``label_map`` (``[H, W]`` uint16) and
    ``segments`` (a JSON string of `segment_records` with COCO RLE masks) per image. Each image size is one pipeline
    call, with the same noise as `DatasetRun`, so results match the command line's.
    """

    def __init__(self, model: str, prompts: Sequence[str], device: str | None = None, image_column: str = "image",
                 seed: int = 0, pipeline_kwargs: dict | None = None):  # fmt: skip
        import torch

        from digseg_diffusers.pipeline_digseg import DiGSegPipeline

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = DiGSegPipeline.from_pretrained(model).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts, self.image_column, self.seed = list(prompts), image_column, seed
        self.pipeline_kwargs = dict(pipeline_kwargs or {})

    def __call__(self, batch: dict) -> dict:
        from digseg_diffusers.image_processing import to_float_rgb

        images = [to_float_rgb(image) for image in batch[self.image_column]]
        label_maps, segments = [None] * len(images), [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[:2]), []).append(i)
        for indices in by_size.values():
            same_size = [images[i] for i in indices]
            output = segment_images(self.pipe, same_size, self.prompts, self.seed, self.pipeline_kwargs)
            for j, i in enumerate(indices):
                label_maps[i] = np.asarray(output.label_maps[j]).astype(np.uint16)
                segments[i] = json.dumps(segment_records(output, j, rle=True))
        return {**batch, "label_map": label_maps, "segments": segments}
