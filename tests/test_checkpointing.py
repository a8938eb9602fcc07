"""Crash-safe training checkpoints: complete-or-invisible saves, `latest`, rotation, resume errors, kills."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from digseg_diffusers import atomic_io
from digseg_diffusers.training import checkpointing
from digseg_diffusers.adapter import LORA_WEIGHTS_NAME
from digseg_diffusers.training.checkpointing import (
    MANIFEST_NAME,
    CheckpointError,
    DiskFullError,
    TrainingRecord,
    checkpoint_problem,
    checkpoint_settings,
    clear_previous_run,
    find_latest_checkpoint,
    previous_run,
    resolve_resume_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    settings_differences,
)
from digseg_diffusers.data.synthetic import write_dataset
from digseg_diffusers.testing_utils import make_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
FILES = {"optimizer.bin": 300, "scheduler.bin": 40, "random_states_0.pkl": 90, "adapter/digseg_adapter.safetensors": 200}


def fake_checkpoint(output_dir: Path, step: int, manifest: bool = True) -> Path:
    """A checkpoint folder as `save_checkpoint` leaves it (file contents do not matter to completeness)."""
    folder = output_dir / f"checkpoint-{step}"
    for name, size in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(bytes([step % 256]) * size)
    (folder / "training_state.json").write_text(json.dumps({"global_step": step}))
    if manifest:
        checkpointing.write_manifest(folder, step)
    return folder


def _empty(folder):
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


HALF_WRITTEN = {
    "empty folder": _empty,
    "optimizer missing": lambda f: (f / "optimizer.bin").unlink(),
    "optimizer truncated": lambda f: (f / "optimizer.bin").write_bytes(b"\0" * 10),
    "adapter truncated": lambda f: (f / "adapter/digseg_adapter.safetensors").write_bytes(b"x"),
    "manifest missing": lambda f: (f / MANIFEST_NAME).unlink(),
    "manifest truncated": lambda f: (f / MANIFEST_NAME).write_text('{"format": "digseg-checkpoint", "st'),
    "manifest of another step": lambda f: checkpointing.write_manifest(f, 6),
}


@pytest.mark.parametrize("breakage", sorted(HALF_WRITTEN))
def test_latest_skips_a_half_written_newest_checkpoint_with_a_warning(tmp_path, breakage):
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 6)
    broken = fake_checkpoint(tmp_path, 7)
    HALF_WRITTEN[breakage](broken)
    warnings = []
    assert checkpoint_problem(broken) is not None
    assert find_latest_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "checkpoint-6"
    assert len(warnings) == 1 and str(broken) in warnings[0]


def test_latest_ignores_an_interrupted_save_and_the_next_save_removes_it(tmp_path):
    fake_checkpoint(tmp_path, 3)
    leftover = atomic_io.temporary_sibling(tmp_path / "checkpoint-4", "incomplete")
    leftover.mkdir()
    (leftover / "optimizer.bin").write_bytes(b"partial")
    warnings = []
    assert find_latest_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "checkpoint-3"
    assert [w for w in warnings if leftover.name in w]
    assert checkpointing.checkpoint_dirs(tmp_path) == [tmp_path / "checkpoint-3"]  # invisible to checkpoint-* globs
    fake_checkpoint(tmp_path, 4)
    rotate_checkpoints(tmp_path, None)
    assert not leftover.exists()


def test_latest_of_a_folder_without_checkpoints_is_none(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None


def test_rotation_keeps_the_newest_complete_checkpoints_only(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    legacy = fake_checkpoint(tmp_path, 5, manifest=False)  # never counted as one of the kept ones, never deleted
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in checkpointing.checkpoint_dirs(tmp_path)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert legacy.is_dir() and not list(tmp_path.glob(".*"))


def test_an_explicit_resume_path_must_exist_and_be_complete(tmp_path):
    fake_checkpoint(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"checkpoint-20: no such folder; complete checkpoints in .*: checkpoint-2"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-20"), tmp_path)
    broken = fake_checkpoint(tmp_path, 3)
    (broken / "scheduler.bin").unlink()
    with pytest.raises(CheckpointError, match="incomplete: scheduler.bin is missing"):
        resolve_resume_checkpoint(str(broken), tmp_path)
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path) == tmp_path / "checkpoint-2"


def test_a_checkpoint_without_manifest_is_incomplete_even_when_named(tmp_path):
    """Every checkpoint this package writes has a manifest; one without is an interrupted save (no older format)."""
    unfinished = fake_checkpoint(tmp_path, 4, manifest=False)
    with pytest.raises(CheckpointError, match="incomplete: no digseg_checkpoint.json"):
        resolve_resume_checkpoint(str(unfinished), tmp_path)
    warnings = []
    assert find_latest_checkpoint(tmp_path, warn=warnings.append) is None
    assert "Skipping incomplete checkpoint" in warnings[0] and "no digseg_checkpoint.json" in warnings[0]


def test_publish_directory_replaces_an_existing_folder_whole(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_io.staged_directory(final) as staging:
        (staging / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # invisible until complete
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and not list(tmp_path.glob(".*"))
    with pytest.raises(RuntimeError):
        with atomic_io.staged_directory(final) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and not list(tmp_path.glob(".*"))


def test_training_record_counts_skipped_files_not_skip_events():
    record = TrainingRecord()
    for _ in range(7):  # a bad file drawn in every epoch, and a batch that passed over two
        record.add_skipped([["bad_a.png"], [], ["bad_a.png", "bad_b.png"]])
    record.add_skipped(["bad_c.png"])
    restored = TrainingRecord()
    restored.load_state_dict(json.loads(json.dumps(record.state_dict())))
    assert restored.skipped_paths == {"bad_a.png", "bad_b.png", "bad_c.png"}


def test_train_adapter_refuses_a_resume_path_that_does_not_exist(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "training"))
    try:
        import train_adapter
    finally:
        sys.path.pop(0)
    argv = [
        "--pretrained_model_name_or_path", str(tmp_path / "no_model"), "--train_data_dir", str(tmp_path),
        "--output_dir", str(tmp_path / "out"), "--report_to", "none",
        "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-12"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:  # before any model is loaded
        train_adapter.main(argv)
    assert exit_info.value.code == 2
    assert "checkpoint-12: no such folder" in capsys.readouterr().err


def test_manifest_records_the_run_settings_and_differences_name_them(tmp_path):
    settings = {"seed": 0, "scale_range": (0.8, 1.2), "learning_rate": 1e-4, "max_train_steps": 20, "old_option": 1}
    folder = fake_checkpoint(tmp_path, 5, manifest=False)
    checkpointing.write_manifest(folder, 5, settings)
    assert checkpoint_problem(folder) is None
    recorded = checkpoint_settings(folder)
    now = {"seed": 1, "scale_range": [0.8, 1.2], "learning_rate": 1e-4, "max_train_steps": 40, "new_option": 2}
    # A tuple equals the list JSON made of it; an option only one side knows is not compared; may_change is skipped.
    assert settings_differences(recorded, now, may_change={"max_train_steps"}) == ["seed: 0 in the checkpoint, 1 now"]
    assert settings_differences(recorded, dict(recorded, max_train_steps=40), may_change={"max_train_steps"}) == []
    assert checkpoint_settings(fake_checkpoint(tmp_path, 6)) is None  # written without settings (older version)


def test_previous_run_and_clearing_it_touch_only_the_runs_outputs(tmp_path):
    assert previous_run(tmp_path, ["adapter", "train_summary.json"]) == []
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "train_summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    atomic_io.temporary_sibling(tmp_path / "checkpoint-11", "incomplete").mkdir()
    found = previous_run(tmp_path, ["adapter", "pipeline", "train_summary.json"])
    assert [p.name for p in found] == ["checkpoint-10", "adapter", "train_summary.json"]
    clear_previous_run(tmp_path, ["adapter", "pipeline", "train_summary.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


class FakeAccelerator:
    """What `save_checkpoint` uses of an Accelerator (one process); `save_state` writes like accelerate's does."""

    is_main_process = True

    def __init__(self, write=None):
        self.write = write or (lambda path, data: Path(path).write_bytes(data))

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        self.write(Path(folder) / "model.bin", b"w" * 1000)
        self.write(Path(folder) / "optimizer.bin", b"o" * 3000)


def _out_of_space_on_optimizer(path, data):
    if path.name == "optimizer.bin":
        path.write_bytes(data[:100])  # the writer got part of the way
        raise OSError(errno.ENOSPC, "No space left on device")
    path.write_bytes(data)


def test_a_full_disk_during_a_checkpoint_save_keeps_the_earlier_ones_and_leaves_nothing(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, 1, {"losses": [[1, 0.5]]})
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()}
    with pytest.raises(DiskFullError, match=r"the disk is full: no space left to write checkpoint-2 in .*MB free"):
        save_checkpoint(FakeAccelerator(_out_of_space_on_optimizer), tmp_path, 2, {"losses": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no staging folder left taking space
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()} == before


def test_a_writer_error_is_put_down_to_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    # torch's zip writer says only this when the disk fills up: the free space decides.
    def torch_style_failure(path, data):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 114560 vs 114452")

    with pytest.raises(RuntimeError, match="unexpected pos") as plenty:
        save_checkpoint(FakeAccelerator(torch_style_failure), tmp_path, 1)
    assert not isinstance(plenty.value, DiskFullError)
    monkeypatch.setattr(checkpointing, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError, match="the disk is full"):
        save_checkpoint(FakeAccelerator(torch_style_failure), tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL at chosen and random moments, resume each time: always resumes, ends bit-identical to a run never killed
# ----------------------------------------------------------------------------------------------------------------

MAX_STEPS = 24
TOTAL_LIMIT = 2
CHECKPOINT_FAULTS = [  # each fires at the second save of its attempt, so every attempt also makes progress
    "checkpoint_folder_empty",
    "checkpoint_adapter_only",
    "checkpoint_optimizer_half_written",
    "checkpoint_files_written_no_manifest",
    "checkpoint_complete_not_renamed",
    "checkpoint_renamed_not_rotated",
    "rotation_half_done",
]
FINAL_FAULTS = ["final_adapter_without_card", "final_outputs_without_summary"]
RANDOM_KILLS = 5


@pytest.fixture(scope="module")
def kill_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_dataset(root / "data", "train", num_images=5, size=32)
    bad_image = sorted((root / "data" / "train" / "images").iterdir())[2]
    bad_image.write_bytes(b"not an image")  # skipped in every epoch: one file
    make_tiny_pipeline().save_pretrained(root / "base")
    argv = [
        "--pretrained_model_name_or_path", str(root / "base"), "--train_data_dir", str(root / "data"),
        "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
        "--max_train_steps", str(MAX_STEPS), "--checkpointing_steps", "1",
        "--checkpoints_total_limit", str(TOTAL_LIMIT), "--report_to", "none",
    ]  # fmt: skip
    attempts = [{"kind": name, "occurrence": 2} for name in CHECKPOINT_FAULTS]
    attempts += [{"kind": "random"}] * RANDOM_KILLS
    attempts += [{"kind": name} for name in FINAL_FAULTS] + [{"kind": "finish"}, {"kind": "finish"}]
    plan = {"root": str(root), "seed": 0, "argv": argv, "max_train_steps": MAX_STEPS, "attempts": attempts}
    (root / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    harness = REPO / "tests" / "train_kill_harness.py"
    result = subprocess.run(
        [sys.executable, str(harness), str(root / "plan.json"), str(root / "report.json")],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "report.json").read_text())
    return root, bad_image, report


def _log_tail(attempt):
    return Path(attempt["log"]).read_text(errors="replace")[-2500:]


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill harness forks")


@needs_fork
@pytest.mark.slow
def test_every_kill_is_followed_by_a_working_resume(kill_report):
    _, _, report = kill_report
    reference, *chain = report["attempts"]
    assert reference["returncode"] == 0, _log_tail(reference)
    killed = [a for a in chain if a["signal"] == signal.SIGKILL]
    for attempt in chain:  # killed by us, or ran without error: never a failed resume
        assert attempt["signal"] == signal.SIGKILL or attempt["returncode"] == 0, _log_tail(attempt)
    for attempt in chain:
        if attempt["kind"] not in ("random", "finish"):
            assert attempt["fault_fired"] and attempt["signal"] == signal.SIGKILL, (attempt["kind"], _log_tail(attempt))
    assert chain[-1]["returncode"] == chain[-2]["returncode"] == 0
    randoms = [a for a in chain if a["kind"] == "random"]
    killed_randomly = [a for a in randoms if a["signal"] == signal.SIGKILL]
    assert len(killed_randomly) >= RANDOM_KILLS - 1  # a random delay may outlast the attempt's last step, rarely
    # The kill inside the first checkpoint save leaves its staging folder: the next attempt names it and goes on.
    after_empty = chain[chain.index(next(a for a in chain if a["kind"] == "checkpoint_folder_empty")) + 1]
    assert any(".incomplete.tmp" in line for line in after_empty["warned_incomplete"])
    print(
        f"\nkill test: {len(killed)} SIGKILLs ({len(killed) - len(killed_randomly)} at named points, "
        f"{len(killed_randomly)} random), {len(chain)} resumes, {sum(a['returncode'] == 0 for a in chain)} ran to the "
        f"end, 0 failed; step time {report['step_time_s'] * 1000:.0f} ms"
    )


@needs_fork
@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(kill_report):
    root, bad_image, _ = kill_report
    expected = load_file(root / "reference" / "adapter" / LORA_WEIGHTS_NAME)
    resumed = load_file(root / "chain" / "adapter" / LORA_WEIGHTS_NAME)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    reference_summary = json.loads((root / "reference" / "train_summary.json").read_text())
    chain_summary = json.loads((root / "chain" / "train_summary.json").read_text())
    assert chain_summary["global_step"] == reference_summary["global_step"] == MAX_STEPS
    # The loss record survives every kill: the whole run's losses, bit for bit.
    assert [step for step, _ in chain_summary["losses"]] == list(range(1, MAX_STEPS + 1))
    assert chain_summary["losses"] == reference_summary["losses"]
    # One unreadable file, met in every epoch (and by several killed processes): one skipped file.
    assert reference_summary["skipped_files"] == chain_summary["skipped_files"] == 1
    assert chain_summary["skipped_paths"] == [str(bad_image)]
    assert (root / "chain" / "adapter" / "README.md").is_file()


@needs_fork
@pytest.mark.slow
def test_after_the_kills_only_complete_checkpoints_remain(kill_report):
    root, _, _ = kill_report
    chain = root / "chain"
    assert [p.name for p in checkpointing.checkpoint_dirs(chain)] == [f"checkpoint-{MAX_STEPS - 1}", f"checkpoint-{MAX_STEPS}"]
    assert all(checkpoint_problem(p) is None for p in checkpointing.checkpoint_dirs(chain))
    assert not [p.name for p in chain.iterdir() if p.name.startswith(".")]


@needs_fork
@pytest.mark.slow
def test_resuming_a_finished_run_does_nothing(kill_report):
    root, _, report = kill_report
    last = report["attempts"][-1]
    log = Path(last["log"]).read_text()
    assert "nothing to do" in log and "Resuming from" not in log
    assert last["end_step"] == MAX_STEPS
    adapter = root / "chain" / "adapter" / LORA_WEIGHTS_NAME
    # Written by the attempt before the last (which finished the outputs), not touched since.
    before_last = Path(report["attempts"][-2]["log"]).stat().st_mtime
    assert adapter.stat().st_mtime <= before_last
