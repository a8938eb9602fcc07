"""The evaluation report: charts through matplotlib (the optional ``charts`` extra), and a complete report without it."""

import json
import logging
import sys

import numpy as np
import pytest
from PIL import Image

from digseg_diffusers.evaluation.report import CHARTS_INSTALL_HINT, plot_lines, write_evaluation_report
from digseg_diffusers.evaluation.runner import EvaluationAccumulator

CLASSES = ["circle", "square", "a class name much longer than thirty-two characters"]


def make_results() -> dict:
    """A report document as training/evaluate.py builds it, from real counts of two random images."""
    rng = np.random.default_rng(0)
    accumulator = EvaluationAccumulator(CLASSES, ignore_index=255, include_background=True)
    for _ in range(2):
        label = rng.integers(-1, 2, size=(8, 8))  # classes 0 and 1 and background; the third class never appears
        probabilities = rng.random((len(CLASSES), 8, 8)).astype(np.float32)
        label_map = probabilities.argmax(0) + 1
        accumulator.add(label, list(range(len(CLASSES))), probabilities, label_map)
    setting = accumulator.compute()
    setting.pop("proposal")
    return {
        "pipeline": "tiny",
        "adapter": None,
        "protocol": "closed-vocabulary",
        "proposer": None,
        "dataset": {"name": "shapes", "format": "folder", "split": "val", "num_images": 2, "class_names": CLASSES,
                    "background_class": True},
        "inference": {"processing_resolution": 8, "mask_threshold": 0.7, "background_threshold": 0.7,
                      "dtype": "float32", "seed": 0},
        "num_processes": 1,
        "settings": json.loads(json.dumps({"1x1": setting, "2x1": setting}, default=float)),
    }  # fmt: skip


def test_report_with_matplotlib_draws_the_charts_on_agg_without_pyplot(tmp_path):
    results = make_results()
    modules_before = set(sys.modules)
    paths = write_evaluation_report(results, tmp_path)
    assert "matplotlib.pyplot" not in set(sys.modules) - modules_before  # no global figure state
    assert set(paths) == {"json", "markdown", "iou_vs_threshold", "per_class_iou_1x1", "per_class_iou_2x1"}
    assert json.loads((tmp_path / "evaluation.json").read_text()) == results
    with Image.open(paths["iou_vs_threshold"]) as chart:
        assert chart.format == "PNG" and chart.size == (640, 420)
    with Image.open(paths["per_class_iou_1x1"]) as chart:
        assert chart.format == "PNG" and chart.size == (640, 70 + 18 * (len(CLASSES) + 1))  # one bar per class + bg
        assert len(set(chart.convert("RGB").getdata())) > 2  # something was drawn
    report = (tmp_path / "evaluation.md").read_text()
    assert "![IoU against the mask threshold](iou_vs_threshold.png)" in report
    assert "![Per-class IoU, setting 2x1](per_class_iou_2x1.png)" in report
    assert CHARTS_INSTALL_HINT not in report
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.fixture
def without_matplotlib(monkeypatch):
    """Make every ``import matplotlib...`` fail, as on an install without the charts extra."""
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_report_without_matplotlib_writes_the_rest_and_says_how_to_get_charts(tmp_path, without_matplotlib, caplog):
    results = make_results()
    with caplog.at_level(logging.WARNING, logger="digseg_diffusers.evaluation.report"):
        paths = write_evaluation_report(results, tmp_path)
    assert set(paths) == {"json", "markdown"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "evaluation.md"]
    assert json.loads((tmp_path / "evaluation.json").read_text()) == results
    report = (tmp_path / "evaluation.md").read_text()
    assert "| 1x1 |" in report and "| circle |" in report and ".png" not in report
    hint_lines = [line for line in report.splitlines() if "pip install matplotlib" in line]
    assert hint_lines == [CHARTS_INSTALL_HINT] and ".[charts]" in CHARTS_INSTALL_HINT
    assert "pip install matplotlib" in caplog.text


def test_plot_lines_without_matplotlib_names_the_install(tmp_path, without_matplotlib):
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        plot_lines(tmp_path / "curve.png", [0.1, 0.5], {"mean": [0.2, None]}, "IoU")
    assert not list(tmp_path.iterdir())
