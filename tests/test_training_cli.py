"""`training/train_adapter.py`'s command line and start-up: `--help` without torch, every default shown, both
spellings, the tracker default, and what is refused (one line, exit code 2) before any model is loaded: an output
folder holding another run, a checkpoint of a run with other settings, missing data, an unreachable Hub id. Then a
full disk while training (one line, exit code 1, nothing lost)."""

import errno
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from digseg_diffusers.training import checkpointing
from digseg_diffusers.data.synthetic import write_dataset
from digseg_diffusers.testing_utils import make_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_adapter.py"
HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "digseg_diffusers.pipeline_digseg")


@pytest.fixture
def train_adapter(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import train_adapter

    yield train_adapter
    sys.modules.pop("train_adapter", None)


def test_help_imports_no_heavy_module_and_shows_the_example():
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import train_adapter\n"
        "try:\n    train_adapter.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('IMPORTED', [m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout
    assert "accelerate launch training/train_adapter.py" in result.stdout  # the epilog's example


def test_help_shows_a_default_for_every_option(train_adapter):
    text = train_adapter.build_parser().format_help()
    options = text.split("\n\n", 2)[2].split("\nexample")[0]  # after usage and description, before the epilog
    entries, current = [], ""
    for line in options.splitlines():
        if line.startswith("  -"):
            entries.append(current)
            current = line
        elif line.startswith(" "):
            current += " " + line.strip()
    entries = [entry for entry in entries + [current] if entry and not entry.lstrip().startswith("-h")]
    assert len(entries) > 60
    missing = [entry.split()[0] for entry in entries if "default" not in entry and "(required)" not in entry]
    assert missing == []


def test_every_option_has_both_spellings(train_adapter, tmp_path):
    parser = train_adapter.build_parser()
    for action in parser._actions:
        snake = [name for name in action.option_strings if "_" in name]
        for name in snake:
            assert name.replace("_", "-") in action.option_strings, name
    common = ["--train_data_dir", "d", "--output_dir", "o", "--base_model", "b", "--max_train_steps", "7"]
    dashed = [name.replace("_", "-") if name.startswith("--") else name for name in common]
    assert train_adapter.parse_args(dashed + ["--report-to", "none"]) == train_adapter.parse_args(common + ["--report_to", "none"])


def test_option_choices_match_the_library(train_adapter):
    """The script writes its choices out (so --help needs no torch); they must be the library's."""
    from digseg_diffusers import adapter, data, noise
    from digseg_diffusers.training import step as training_step

    assert train_adapter.ADAPTER_MODES == adapter.ADAPTER_MODES
    assert train_adapter.DATASET_FORMATS == tuple(sorted(data.READERS))
    assert train_adapter.NOISE_VARIANTS == noise.NOISE_VARIANTS
    assert train_adapter.TIMESTEP_BIAS_STRATEGIES == noise.TIMESTEP_BIAS_STRATEGIES
    assert train_adapter.LOSSES == training_step.LOSSES


@pytest.mark.parametrize("installed, expected", [({"tensorboard"}, "tensorboard"), ({"wandb"}, "none"), (set(), "none")])
def test_report_to_defaults_to_an_installed_tracker(train_adapter, monkeypatch, installed, expected):
    trackers = {package for packages in train_adapter.TRACKER_PACKAGES.values() for package in packages}
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in trackers:
            return real_find_spec("json") if name in installed else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    argv = ["--train_data_dir", "d", "--output_dir", "o", "--base_model", "b"]
    assert train_adapter.parse_args(argv).report_to == expected


# ------------------------------------------------------------------------------------- refused before any model


@pytest.fixture
def command(tmp_path, train_adapter, monkeypatch):
    """A command on a small dataset and a local (empty) model folder; `train` is replaced by a recorder."""
    write_dataset(tmp_path / "data", "train", num_images=2, size=32)
    (tmp_path / "model").mkdir()
    calls = []
    monkeypatch.setattr(train_adapter, "train", lambda *args, **kwargs: calls.append(args) or {})
    argv = [
        "--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--report_to", "none", "--max_train_steps", "20",
    ]  # fmt: skip
    return argv, calls


def _refusal(train_adapter, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_adapter.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_adapter.py: error: "), lines
    return lines[0]


def _earlier_run(train_adapter, argv, output_dir: Path, steps=(10, 20)) -> None:
    """A finished run's outputs, its checkpoints recording the settings of `argv`."""
    settings = train_adapter.run_settings(train_adapter.parse_args(argv))
    for step in steps:
        folder = output_dir / f"checkpoint-{step}"
        (folder / "adapter").mkdir(parents=True)
        (folder / "optimizer.bin").write_bytes(b"o" * step)
        (folder / "training_state.json").write_text(json.dumps({"global_step": step}))
        checkpointing.write_manifest(folder, step, settings)
    (output_dir / "adapter").mkdir()
    (output_dir / "train_summary.json").write_text(json.dumps({"global_step": steps[-1]}))


def test_an_output_dir_holding_another_run_is_refused(train_adapter, command, tmp_path, capsys):
    argv, calls = command
    _earlier_run(train_adapter, argv, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    line = _refusal(train_adapter, argv + ["--max_train_steps", "5", "--seed", "1"], capsys)
    assert "holds another run (checkpoint-10, checkpoint-20, adapter, train_summary.json)" in line
    assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before and calls == []
    # Continued with the same settings (more steps, other checkpointing): accepted, from its newest checkpoint.
    train_adapter.main(argv + ["--max_train_steps", "30", "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest"])
    assert calls[-1][2] == tmp_path / "out" / "checkpoint-20"
    train_adapter.main(argv + ["--seed", "1", "--overwrite_output_dir"])  # replaced (cleared by `train`, not here)
    assert calls[-1][2] is None


def test_a_checkpoint_of_a_run_with_other_settings_is_refused(train_adapter, command, tmp_path, capsys):
    argv, calls = command
    _earlier_run(train_adapter, argv, tmp_path / "out")
    line = _refusal(train_adapter, argv + ["--seed", "1", "--learning_rate", "1e-3", "--resume_from_checkpoint", "latest"], capsys)
    assert "checkpoint-20 belongs to a run with other settings" in line
    assert "learning_rate: 0.0001 in the checkpoint, 0.001 now" in line and "seed: 0 in the checkpoint, 1 now" in line
    # Explicitly named, same answer; a checkpoint of another folder cannot be resumed into one holding a run.
    line = _refusal(train_adapter, argv + ["--seed", "1", "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-10")], capsys)
    assert "seed: 0 in the checkpoint, 1 now" in line
    _earlier_run(train_adapter, [a.replace(str(tmp_path / "out"), str(tmp_path / "other")) for a in argv], tmp_path / "other")
    line = _refusal(train_adapter, argv + ["--resume_from_checkpoint", str(tmp_path / "other" / "checkpoint-10")], capsys)
    assert "holds another run" in line
    assert calls == []


def test_latest_with_outputs_but_no_complete_checkpoint_is_refused(train_adapter, command, tmp_path, capsys):
    argv, calls = command
    (tmp_path / "out" / "adapter").mkdir(parents=True)
    (tmp_path / "out" / "train_summary.json").write_text("{}")
    line = _refusal(train_adapter, argv + ["--resume_from_checkpoint", "latest"], capsys)
    assert "holds a run (adapter, train_summary.json) but no complete checkpoint" in line and calls == []
    train_adapter.main([a.replace(str(tmp_path / "out"), str(tmp_path / "fresh")) for a in argv] + ["--resume_from_checkpoint", "latest"])
    assert calls[-1][2] is None  # an empty folder: a new run


def test_missing_data_is_reported_before_the_model_is_looked_for(train_adapter, command, tmp_path, capsys):
    argv, calls = command
    argv = [a.replace(str(tmp_path / "data"), str(tmp_path / "no_data")).replace(str(tmp_path / "model"), "someone/no-such-model") for a in argv]
    line = _refusal(train_adapter, argv, capsys)
    assert f"--train_data_dir: dataset root not found: expected the folder {tmp_path / 'no_data'}" in line and calls == []


@pytest.mark.parametrize("offline", [True, False])
def test_an_uncached_hub_id_without_the_hub_fails_at_once(train_adapter, command, tmp_path, capsys, monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    argv, calls = command
    argv = [a.replace(str(tmp_path / "model"), "someone/digseg-base") for a in argv]
    line = _refusal(train_adapter, argv, capsys)
    assert "--pretrained_model_name_or_path: Cannot load the DiGSeg pipeline 'someone/digseg-base'" in line
    assert "HF_HUB_OFFLINE" in line and "local folder" in line and calls == []


# ------------------------------------------------------------------------------------------- real short runs


@pytest.fixture
def tiny_run(tmp_path, train_adapter):
    write_dataset(tmp_path / "data", "train", num_images=4, size=32)
    make_tiny_pipeline().save_pretrained(tmp_path / "base")
    argv = [
        "--pretrained_model_name_or_path", str(tmp_path / "base"), "--train_data_dir", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--train_batch_size", "2",
        "--lr_warmup_steps", "0", "--report_to", "none",
    ]  # fmt: skip
    return argv


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_previous_run_whole(train_adapter, tiny_run, tmp_path):
    train_adapter.main(tiny_run + ["--max_train_steps", "4", "--checkpointing_steps", "2"])
    (tmp_path / "out" / "notes.txt").write_text("mine")
    summary = train_adapter.main(tiny_run + ["--max_train_steps", "1", "--seed", "1", "--overwrite_output_dir"])
    assert summary["global_step"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", "checkpoint-1", "notes.txt", "train_summary.json"]
    assert checkpointing.checkpoint_settings(tmp_path / "out" / "checkpoint-1")["seed"] == 1


@pytest.mark.slow
def test_a_full_disk_during_training_ends_with_one_line_and_loses_nothing(train_adapter, tiny_run, tmp_path, monkeypatch, capsys):
    import torch

    real_save = torch.save
    saves = []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):  # the 2nd checkpoint's optimizer.bin finds the disk full
        if str(f).endswith("optimizer.bin"):
            saves.append(f)
            if len(saves) == 2:
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(SystemExit) as exit_info:
        train_adapter.main(tiny_run + ["--max_train_steps", "3", "--checkpointing_steps", "1"])
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in errors[0]
    assert "the disk is full: no space left to write checkpoint-2" in errors[0]
    assert "newest complete checkpoint: checkpoint-1" in errors[0] and "--resume_from_checkpoint latest" in errors[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint-1"]  # no partial checkpoint-2 anywhere
    assert checkpointing.find_latest_checkpoint(tmp_path / "out") == tmp_path / "out" / "checkpoint-1"
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes...
    resume = tiny_run + ["--max_train_steps", "3", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]

    def summary_finds_the_disk_full(path, document):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_atomic_write_json = train_adapter.atomic_write_json
    monkeypatch.setattr(train_adapter, "atomic_write_json", summary_finds_the_disk_full)  # ...until the summary
    with pytest.raises(SystemExit) as exit_info:
        train_adapter.main(resume)
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and f"no space left to write {tmp_path / 'out' / 'train_summary.json'}" in errors[0]
    assert "newest complete checkpoint: checkpoint-3" in errors[0]
    assert not (tmp_path / "out" / "train_summary.json").exists() and (tmp_path / "out" / "adapter").is_dir()
    monkeypatch.setattr(train_adapter, "atomic_write_json", real_atomic_write_json)
    summary = train_adapter.main(resume)  # the finished run's outputs are written, without training again
    assert [step for step, _ in summary["losses"]] == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["global_step"] == 3
