"""Training checkpoints that survive a kill at any moment: complete or invisible, never half-written.

accelerate's `save_state` writes file by file into its target folder (and its automatic naming deletes old
checkpoints before writing the new one), so a kill mid-save leaves a `checkpoint-N` that looks newest but cannot be
loaded. Here every process saves into a hidden staging folder; the main process adds ``training_state.json`` and,
last, the manifest ``digseg_checkpoint.json`` (every file with its size, and the run's settings); the folder is then
flushed and renamed to ``checkpoint-N``, and only then are checkpoints beyond ``total_limit`` and leftovers of
interrupted saves removed.

A checkpoint is complete when its manifest is there and every file it lists has the recorded size; ``latest`` is
the newest complete one. The recorded settings let a resume tell this run's checkpoint from another run's
(`settings_differences`). A failed save removes its staging folder; a full disk raises `DiskFullError`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from digseg_diffusers.atomic_io import (
    TEMPORARY_SUFFIX,
    atomic_write_json,
    is_disk_full,
    publish_directory,
    remove_directory,
    temporary_sibling,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
MANIFEST_NAME = "digseg_checkpoint.json"
TRAINING_STATE_NAME = "training_state.json"
MANIFEST_FORMAT = "digseg-checkpoint"
NO_MANIFEST = f"no {MANIFEST_NAME} (the save was interrupted)"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that was asked for by path does not exist or is incomplete."""


class DiskFullError(OSError):
    """The disk filled up while a checkpoint or a run's outputs were written; its message is one line for the user."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a folder named ``checkpoint-N``; None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder of a run, complete or not, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Hidden staging or removal folders left by a save or rotation that was killed."""
    return sorted(p for p in Path(output_dir).glob(f".{CHECKPOINT_PREFIX}*{TEMPORARY_SUFFIX}") if p.is_dir())


def write_manifest(folder: str | Path, step: int, settings: Mapping[str, Any] | None = None) -> None:
    """Record every file under `folder` with its size (and the run's `settings`, JSON); written last, it marks the
    checkpoint complete."""
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": files}
    if settings is not None:
        manifest["settings"] = dict(settings)
    atomic_write_json(folder / MANIFEST_NAME, manifest)


def checkpoint_settings(folder: str | Path) -> dict | None:
    """The run settings a checkpoint's manifest records (None: no manifest, or written before settings were kept)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = manifest.get("settings") if isinstance(manifest, dict) else None
    return dict(settings) if isinstance(settings, dict) else None


def settings_differences(
    recorded: Mapping[str, Any], current: Mapping[str, Any], may_change: Collection[str] = ()
) -> list[str]:
    """``"name: VALUE in the checkpoint, VALUE now"`` for every setting that differs, apart from `may_change`.

    Values are compared as JSON (a tuple equals the list it was saved as). A setting only one side knows (an option
    added or removed by another version of the script) cannot be compared and is left out.
    """
    differences = []
    for name in sorted(set(recorded) & set(current) - set(may_change)):
        before, now = _as_json(recorded[name]), _as_json(current[name])
        if before != now:
            differences.append(f"{name}: {json.dumps(before)} in the checkpoint, {json.dumps(now)} now")
    return differences


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
        warn(f"Skipping incomplete checkpoint {folder}: {problem}.")
    return None


def resolve_resume_checkpoint(
    value: str, output_dir: str | Path, warn: Callable[[str], None] = logger.warning
) -> Path | None:
    """The folder `--resume_from_checkpoint VALUE` means.

    ``"latest"``: the newest complete checkpoint in `output_dir`, or None (a new run). A path: that folder, which
    must exist and be complete, manifest included (`CheckpointError` otherwise).
    """
    if value == "latest":
        return find_latest_checkpoint(output_dir, warn=warn)
    path = Path(value).expanduser()
    if not path.exists():
        complete = [p.name for p in checkpoint_dirs(output_dir) if checkpoint_problem(p) is None]
        available = f"; complete checkpoints in {output_dir}: {', '.join(complete)}" if complete else ""
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such folder{available}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {value} is incomplete: {problem}")
    if saved_step(path) is None:
        raise CheckpointError(f"--resume_from_checkpoint {value}: cannot tell its step (name it checkpoint-N)")
    return path


def saved_step(folder: str | Path) -> int | None:
    """The training step a checkpoint was saved at (its training state, else its name)."""
    step = read_training_state(folder).get("global_step")
    return checkpoint_step(folder) if step is None else int(step)


def read_training_state(folder: str | Path) -> dict:
    """The ``training_state.json`` of a checkpoint ({} when it has none)."""
    path = Path(folder) / TRAINING_STATE_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    training_state: dict | None = None,
    total_limit: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """`accelerator.save_state` into ``output_dir/checkpoint-{step}``, so that it appears only when complete.

    Every process must call this (each writes its RNG state). `training_state` goes beside accelerate's files,
    `settings` into the manifest (both JSON). A failed save removes its staging folder (giving the space back).
    """
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    staging = temporary_sibling(final, "incomplete")
    try:
        with reporting_full_disk(staging, f"{final.name} in {output_dir}"):
            if accelerator.is_main_process:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                atomic_write_json(staging / TRAINING_STATE_NAME, {"global_step": int(step), **(training_state or {})})
                write_manifest(staging, step, settings)
                publish_directory(staging, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


LOW_SPACE_BYTES = 1 << 20
"""Free space below which a failed write is put down to a full disk (torch's writer does not say why it failed)."""


def is_out_of_space(error: BaseException, path: str | Path) -> bool:
    """Whether `error`, raised while writing under `path`, means that the disk (or the user's quota) is full.

    Python's writes raise ``OSError(ENOSPC)`` and safetensors says "os error 28", but torch's zip writer only says
    "unexpected pos" or "file write failed": so any error counts when almost no space is left where it wrote.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if is_disk_full(link) or "No space left on device" in str(link) or "os error 28" in str(link):
            return True
        link = link.__cause__ or link.__context__
    return free_bytes(path) < LOW_SPACE_BYTES


def free_bytes(path: str | Path) -> int:
    """Free space (for this user) on the file system of `path` or of its nearest existing parent."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return LOW_SPACE_BYTES  # cannot tell: do not call it full


@contextlib.contextmanager
def reporting_full_disk(path: str | Path, what: str) -> Iterator[None]:
    """Turn any error of the block that comes from a full disk into a one-line `DiskFullError` naming `what`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_out_of_space(error, path):
            raise
        free = free_bytes(path)
        raise DiskFullError(f"the disk is full: no space left to write {what} ({free / 2**20:.1f} MB free)") from error


def previous_run(output_dir: str | Path, output_names: Iterable[str] = ()) -> list[Path]:
    """What an earlier run left in `output_dir`: its ``checkpoint-N`` folders and those of `output_names` (the
    run's final outputs) that exist. Interrupted saves (hidden) do not count: they are cleaned up anyway."""
    folder = Path(output_dir)
    found = checkpoint_dirs(folder)
    found += [folder / name for name in output_names if (folder / name).exists()]
    return found


def clear_previous_run(output_dir: str | Path, output_names: Iterable[str] = ()) -> list[Path]:
    """Remove what `previous_run` finds, and leftovers of interrupted saves; nothing else in `output_dir`."""
    removed = previous_run(output_dir, output_names) + interrupted_saves(output_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            remove_directory(path)
        else:
            path.unlink()
    return removed


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
