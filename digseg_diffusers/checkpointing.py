"""Training checkpoints that survive a kill at any moment: complete or invisible, never half-written.

`accelerate`'s `save_state` writes its files one by one straight into the folder it is given (and its automatic
naming deletes old checkpoints *before* writing the new one), so a process killed during a save leaves a
`checkpoint-N` folder that looks like the newest but cannot be loaded. Here a checkpoint is written as:

1. every process calls `save_state` into a hidden staging folder (``.checkpoint-N.incomplete.tmp``);
2. the main process adds ``training_state.json`` (losses, validation, skipped files) and last a manifest,
   ``digseg_checkpoint.json``, listing every file with its size;
3. the staging folder is flushed to disk and renamed to ``checkpoint-N`` (atomic);
4. only then are old checkpoints beyond ``total_limit`` removed, and leftovers of interrupted saves deleted.

A ``checkpoint-N`` folder counts as complete when its manifest is there and every file it lists has the recorded
size. ``latest`` is the newest complete one; incomplete ones are named in a warning and skipped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .atomic_io import TEMPORARY_SUFFIX, atomic_write_json, publish_directory, remove_directory, temporary_sibling

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_NAME = "digseg_checkpoint.json"
TRAINING_STATE_NAME = "training_state.json"
MANIFEST_FORMAT = "digseg-checkpoint"
NO_MANIFEST = f"no {MANIFEST_NAME} (the save was interrupted, or an older version wrote it)"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that was asked for by path does not exist or is incomplete."""


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a folder named ``checkpoint-N``; None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder of a run, complete or not, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Hidden staging or removal folders left by a save or rotation that was killed."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".{CHECKPOINT_PREFIX}*{TEMPORARY_SUFFIX}") if p.is_dir())


def write_manifest(folder: str | Path, step: int) -> None:
    """Record every file under `folder` with its size; written last, it marks the checkpoint complete."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    atomic_write_json(folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "step": int(step), "files": files})


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return NO_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_NAME} ({type(error).__name__}: {error})"
    named_step = checkpoint_step(folder)
    if named_step is not None and named_step != step:
        return f"its manifest is for step {step}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def find_latest_checkpoint(output_dir: str | Path, warn: Callable[[str], None] = logger.warning) -> Path | None:
    """The newest complete checkpoint of a run; every newer incomplete one is named in a warning."""
    for leftover in interrupted_saves(output_dir):
        warn(f"Ignoring {leftover}: left by an interrupted checkpoint save (deleted at the next save).")
    for folder in reversed(checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        hint = "; pass it to --resume_from_checkpoint explicitly to load it anyway" if problem == NO_MANIFEST else ""
        warn(f"Skipping incomplete checkpoint {folder}: {problem}{hint}.")
    return None


def resolve_resume_checkpoint(
    value: str,
    output_dir: str | Path,
    legacy_required: Sequence[str] = (),
    warn: Callable[[str], None] = logger.warning,
) -> Path | None:
    """The folder `--resume_from_checkpoint VALUE` means.

    ``"latest"``: the newest complete checkpoint in `output_dir`, or None (a new run). A path: that folder, which
    must exist and be complete (`CheckpointError` otherwise). A folder without a manifest (written by an older
    version) is accepted when the files in `legacy_required` are there, with a warning.
    """
    if value == "latest":
        return find_latest_checkpoint(output_dir, warn=warn)
    path = Path(value).expanduser()
    if not path.exists():
        complete = [p.name for p in checkpoint_dirs(output_dir) if checkpoint_problem(p) is None]
        available = f"; complete checkpoints in {output_dir}: {', '.join(complete)}" if complete else ""
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such folder{available}")
    problem = checkpoint_problem(path)
    if problem == NO_MANIFEST:
        missing = [name for name in legacy_required if not (path / name).exists()]
        if missing:
            raise CheckpointError(f"--resume_from_checkpoint {value} is incomplete: {', '.join(missing)} missing")
        warn(f"{path} has {NO_MANIFEST}; its files are all there, loading it.")
    elif problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {value} is incomplete: {problem}")
    if saved_step(path) is None:
        raise CheckpointError(f"--resume_from_checkpoint {value}: cannot tell its step (name it checkpoint-N)")
    return path


def saved_step(folder: str | Path) -> int | None:
    """The training step a checkpoint was saved at (its training state, else its name)."""
    state = read_training_state(folder)
    if "global_step" in state:
        return int(state["global_step"])
    return checkpoint_step(folder)


def read_training_state(folder: str | Path) -> dict:
    """The ``training_state.json`` of a checkpoint ({} when it has none)."""
    path = Path(folder) / TRAINING_STATE_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    training_state: dict | None = None,
    total_limit: int | None = None,
) -> Path:
    """`accelerator.save_state` into ``output_dir/checkpoint-{step}``, so that it appears only when complete.

    Every process must call this (they all write their RNG state). `training_state` (JSON) is stored beside
    accelerate's files. With `total_limit`, the oldest complete checkpoints beyond it are removed, after the new
    one is in place.
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    staging = temporary_sibling(final, "incomplete")
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(staging / TRAINING_STATE_NAME, {"global_step": int(step), **(training_state or {})})
        write_manifest(staging, step)
        publish_directory(staging, final)
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Keep the newest `total_limit` complete checkpoints; drop older ones and leftovers of interrupted saves."""
    removed = []
    if total_limit is not None:
        complete = [p for p in checkpoint_dirs(output_dir) if checkpoint_problem(p) is None]
        for old in complete[: max(0, len(complete) - total_limit)]:
            remove_directory(old)
            removed.append(old)
    for leftover in interrupted_saves(output_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    if removed:
        logger.info(f"Removed {len(removed)} old checkpoint(s): {', '.join(p.name for p in removed)}")
    return removed


class TrainingRecord:
    """What a run has produced besides weights (losses, validation results, unreadable files), kept across resumes.

    Stored in every checkpoint, so the summary of a resumed run covers the whole run, and `skipped_files` counts
    distinct files (a bad file drawn in every epoch is one file, not one skip per epoch).
    """

    def __init__(self) -> None:
        self.losses: list[list] = []
        self.validation: list[dict] = []
        self.skipped_paths: set[str] = set()

    def add_skipped(self, paths: Iterable[str] | Iterable[Iterable[str]]) -> None:
        """Note skipped files: a list of paths, or a batch's list of per-sample lists."""
        for entry in paths:
            if isinstance(entry, str):
                self.skipped_paths.add(entry)
            else:
                self.skipped_paths.update(entry)

    def synchronize(self, accelerator) -> None:
        """Merge the skipped files every process met (a collective call: every process must make it)."""
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            self.skipped_paths.update(gather_object(sorted(self.skipped_paths)))

    def state_dict(self) -> dict:
        return {"losses": self.losses, "validation": self.validation, "skipped_files": sorted(self.skipped_paths)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [list(entry) for entry in state.get("losses", [])]
        self.validation = list(state.get("validation", []))
        self.skipped_paths = set(state.get("skipped_files", []))
