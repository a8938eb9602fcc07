"""Kill `training/train_adapter.py` with SIGKILL at chosen and at random moments, resuming each time (a test helper).

    python tests/train_kill_harness.py PLAN.json REPORT.json

The harness imports the training script once and runs every attempt in a forked child (a real process that
runs the script's `main`, killed for real), which saves the ~5 s of imports each new interpreter would cost.
An attempt is one of:

- ``reference``: an uninterrupted run into its own folder;
- a named fault: the child patches one function on the save path so that the process SIGKILLs itself there
  (at the fault's `occurrence`-th call), e.g. inside `accelerate`'s `save_state` with `optimizer.bin` half
  written;
- ``random``: the parent waits until the run has reached its next step, then SIGKILLs it after a random delay
  of up to two steps' time (seeded), so the kill can land anywhere in a training step or a checkpoint save;
- ``finish``: a plain resume that must run to the end.

Every attempt after the reference resumes the chain folder with ``--resume_from_checkpoint latest``. The
report lists each attempt's fault, how it ended (return code / signal) and whether its fault fired; the test
asserts on it.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _die(name: str) -> None:
    print(f"KILL-HARNESS: fault {name} fired", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after_calls(name: str, occurrence: int, wanted=lambda *a, **k: True):
    """A decorator factory: wrap a function so the process dies at its `occurrence`-th wanted call."""
    calls = {"n": 0}

    def wrap(function, before=True, action=None):
        def wrapper(*args, **kwargs):
            if wanted(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == occurrence:
                    if action is not None:
                        action(*args, **kwargs)
                    if before:
                        _die(name)
            return function(*args, **kwargs)

        return wrapper

    return wrap


def install_fault(name: str, occurrence: int, train_adapter) -> None:
    """Patch the one function where fault `name` kills the process (in the child only)."""
    import shutil

    import accelerate.accelerator
    import torch

    import digseg_diffusers.atomic_io as atomic_io
    import digseg_diffusers.training.checkpointing as checkpointing

    wrap = _after_calls(name, occurrence)
    if name == "checkpoint_folder_empty":  # staging folder created, nothing written into it yet
        accelerate.Accelerator.save_state = wrap(accelerate.Accelerator.save_state)
    elif name == "checkpoint_adapter_only":  # the save hook wrote the adapter, accelerate's files not yet
        accelerate.accelerator.save_accelerator_state = wrap(accelerate.accelerator.save_accelerator_state)
    elif name == "checkpoint_optimizer_half_written":
        real_save = torch.save

        def half_write(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _die(name)

        is_optimizer = lambda obj, f, *a, **k: str(f).endswith("optimizer.bin")  # noqa: E731
        torch.save = _after_calls(name, occurrence, is_optimizer)(real_save, before=False, action=half_write)
    elif name == "checkpoint_files_written_no_manifest":
        checkpointing.write_manifest = wrap(checkpointing.write_manifest)
    elif name == "checkpoint_complete_not_renamed":
        checkpointing.publish_directory = wrap(checkpointing.publish_directory)
    elif name == "checkpoint_renamed_not_rotated":
        checkpointing.rotate_checkpoints = wrap(checkpointing.rotate_checkpoints)
    elif name == "rotation_half_done":  # an old checkpoint renamed aside, not yet deleted
        deleting = lambda path, *a, **k: "deleting" in str(path)  # noqa: E731
        atomic_io.shutil.rmtree = _after_calls(name, occurrence, deleting)(shutil.rmtree)
    elif name == "final_adapter_without_card":  # the final adapter's weights staged, its card not yet
        train_adapter.write_card = wrap(train_adapter.write_card)
    elif name == "final_outputs_without_summary":
        is_summary = lambda path, *a, **k: str(path).endswith(train_adapter.SUMMARY_NAME)  # noqa: E731
        train_adapter.atomic_write_json = _after_calls(name, occurrence, is_summary)(train_adapter.atomic_write_json)
    else:
        raise ValueError(f"unknown fault {name!r}")


def start_child(train_adapter, argv: list[str], log_path: Path, fault: str | None, occurrence: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: output to its log, the fault patched in, then the script's main
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        import torch

        torch.set_num_threads(1)
        if fault:
            install_fault(fault, occurrence, train_adapter)
        train_adapter.main(argv)
        code = 0
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else 1
        if not isinstance(error.code, int):
            print(error.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int) -> dict:
    return _outcome(os.waitpid(pid, 0)[1])


def poll(pid: int) -> dict | None:
    """The child's outcome if it has ended (reaping it), else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return _outcome(status) if done else None


def _outcome(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"returncode": None, "signal": os.WTERMSIG(status)}
    return {"returncode": os.WEXITSTATUS(status), "signal": None}


def newest_checkpoint_step(folder: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def run_plan(plan: dict) -> dict:
    sys.path.insert(0, str(REPO / "training"))
    import train_adapter

    root = Path(plan["root"])
    rng = random.Random(plan["seed"])
    attempts = []

    # The uninterrupted reference, timed: step_time is one step's share of its training loop (with its save).
    reference = root / "reference"
    pid = start_child(train_adapter, plan["argv"] + ["--output_dir", str(reference)], root / "reference.log", None, 1)
    started = time.perf_counter()
    first_step_at = None
    while (reference_outcome := poll(pid)) is None:
        if first_step_at is None and (reference / "checkpoint-1").exists():
            first_step_at = time.perf_counter()
        time.sleep(0.005)
    ended = time.perf_counter()
    step_time = (ended - (first_step_at or started)) / max(1, plan["max_train_steps"] - 1)
    attempts.append({"kind": "reference", "log": str(root / "reference.log"), **reference_outcome})

    chain = root / "chain"
    chain_argv = plan["argv"] + ["--output_dir", str(chain), "--resume_from_checkpoint", "latest"]
    for number, item in enumerate(plan["attempts"]):
        log_path = root / f"attempt_{number:02d}.log"
        kind, occurrence = item["kind"], item.get("occurrence", 1)
        start_step = newest_checkpoint_step(chain)
        fault = None if kind in ("random", "finish") else kind
        pid = start_child(train_adapter, chain_argv, log_path, fault, occurrence)
        delay, outcome = None, None
        if kind == "random":
            deadline = time.perf_counter() + 120
            while outcome is None and newest_checkpoint_step(chain) <= start_step and time.perf_counter() < deadline:
                outcome = poll(pid)
                time.sleep(0.005)
            if outcome is None:
                delay = rng.uniform(0.0, 2.0 * step_time)
                time.sleep(delay)
                outcome = poll(pid)
                if outcome is None:
                    os.kill(pid, signal.SIGKILL)
        outcome = outcome or wait(pid)
        log = log_path.read_text(errors="replace")
        attempts.append(
            {
                "kind": kind,
                "occurrence": occurrence,
                "start_step": start_step,
                "end_step": newest_checkpoint_step(chain),
                "delay_s": delay,
                "fault_fired": f"fault {kind} fired" in log,
                "warned_incomplete": [line for line in log.splitlines() if "Ignoring" in line or "Skipping incomplete" in line],
                "log": str(log_path),
                **outcome,
            }
        )
    return {"step_time_s": step_time, "reference_seconds": ended - started, "attempts": attempts}


if __name__ == "__main__":
    plan_path, report_path = sys.argv[1:3]
    report = run_plan(json.loads(Path(plan_path).read_text()))
    Path(report_path).write_text(json.dumps(report, indent=2))
