"""The GPU suite and the training-throughput benchmark run (at tiny size: their numbers are not checked here)."""

import json
import os
import re
import subprocess

import pytest
from accelerate.state import AcceleratorState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "performance", "gpu_suite.sh")


def test_gpu_suite_parses_and_runs_benchmarks_that_exist():
    subprocess.run(["bash", "-n", SUITE], check=True)
    scripts = {f"{name}.py" for name in re.findall(r"python -m benchmarks\.performance\.(\w+)", open(SUITE).read())}
    assert {"bench_throughput.py", "bench_pipeline_overhead.py", "bench_training_throughput.py", "bench_dataset_inference.py"} <= scripts
    missing = [s for s in scripts if not os.path.isfile(os.path.join(ROOT, "benchmarks", "performance", s))]
    assert not missing


def test_gpu_demo_training_script_parses_and_calls_the_demo_recipe():
    """training/train_demo_model_gpu.sh (run with --smoke on the CPU when it changes: ~1 min)."""
    script = os.path.join(ROOT, "training", "train_demo_model_gpu.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    assert "training/train_demo_model.py" in text and "benchmarks.quality.demo_fidelity" in text


@pytest.mark.slow
def test_training_throughput_benchmark_runs_the_training_step(tmp_path):
    from benchmarks.performance import bench_training_throughput  # the suite runs it as this module
    output = tmp_path / "training.json"
    try:
        bench_training_throughput.main([
            "--config", "tiny", "--resolution", "32", "--repeats", "1", "--modes", "lora", "--gradient_checkpointing",
            "off", "--latents", "cached", "encoded", "--batch_sizes", "2", "--estimate_resolution", "64",
            "--estimate_batch_sizes", "1", "2", "--output", str(output),
        ])
    finally:
        AcceleratorState._reset_state(True)  # the benchmark's Accelerator must not configure later tests
    results = json.loads(output.read_text())
    rows = {r["latents"]: r for r in results["results"]}
    assert set(rows) == {"cached", "encoded"} and all(r["samples_per_s"] > 0 for r in rows.values())
    assert rows["encoded"]["model_tflop_per_step"] > rows["cached"]["model_tflop_per_step"]  # + the VAE encoder
    estimate = {(e["gradient_checkpointing"], e["batch_size"]): e["activations_gib"] for e in results["memory_estimate"]}
    assert estimate[(False, 2)] > estimate[(False, 1)] > estimate[(True, 1)] > 0
