"""Evaluation reports: the JSON results, a markdown summary and PNG charts.

`training/evaluate.py` writes them for a dataset evaluation (`write_evaluation_report`); `plot_lines` is the one
line chart of the project (IoU against the mask threshold here and in `benchmarks/quality/demo_fidelity.py`).
Charts need matplotlib (the optional ``charts`` extra); without it the report is written without them and says how
to get them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..atomic_io import atomic_file, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

RESULTS_NAME = "evaluation.json"
REPORT_NAME = "evaluation.md"
CURVE_PLOT_NAME = "iou_vs_threshold.png"
CHARTS_INSTALL_HINT = (
    'Charts need matplotlib, which is not installed: pip install matplotlib (or pip install -e ".[charts]")'
)
# result key -> report column
SUMMARY_COLUMNS = {
    "mIoU": "mIoU", "pixel_accuracy": "pixel acc.", "mean_accuracy": "mean acc.", "mean_dice": "mean Dice"
}
BINARY_COLUMNS = {"iou": "IoU", "precision": "precision", "recall": "recall", "f1": "F1", "dice": "Dice"}
DPI = 100  # sizes are given in pixels: a figure of (w / DPI, h / DPI) inches saves as w x h pixels


def write_evaluation_report(results: dict, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``evaluation.json``, ``evaluation.md`` and, with matplotlib, the charts of `results`
    (training/evaluate.py's document) into `output_dir`, each file atomically; returns their paths by kind."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / RESULTS_NAME, "markdown": output_dir / REPORT_NAME}
    charts = importlib.util.find_spec("matplotlib") is not None
    if charts:
        paths["iou_vs_threshold"] = output_dir / CURVE_PLOT_NAME
        plot_iou_vs_threshold(results, paths["iou_vs_threshold"])
        for name, values in results["settings"].items():
            paths[f"per_class_iou_{name}"] = output_dir / f"per_class_iou_{name}.png"
            plot_per_class_iou(values, paths[f"per_class_iou_{name}"], title=f"Per-class IoU, setting {name}")
    else:
        logger.warning(f"{output_dir}: no charts written. {CHARTS_INSTALL_HINT}")
    atomic_write_json(paths["json"], results)
    atomic_write_text(paths["markdown"], markdown_report(results, charts=charts))
    return {kind: str(path) for kind, path in paths.items()}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines."""
    return ["| " + " | ".join(map(str, row)) + " |" for row in [header, ["---"] * len(header), *rows]]


def markdown_report(results: dict, charts: bool = True) -> str:
    """The report in percent; `charts=False` replaces the chart links by the line that says how to get them."""
    dataset = results["dataset"]
    settings = results["settings"]
    inference = results["inference"]
    background = " + background scored as a class" if dataset["background_class"] else ""
    if results["protocol"] == "open-vocabulary":
        protocol = f"open vocabulary: the class proposer `{results['proposer']['source']}` picks each image's classes"
    else:
        protocol = "closed vocabulary: every dataset class is a prompt of every image"
    adapter = f" + adapter `{results['adapter']}`" if results["adapter"] else ""
    lines = [
        "# DiGSeg evaluation",
        "",
        f"- pipeline: `{results['pipeline']}`{adapter}",
        f"- dataset: `{dataset['name']}` ({dataset['format']} reader), split `{dataset['split']}`, "
        f"{dataset['num_images']} images, {len(dataset['class_names'])} classes{background}",
        f"- protocol: {protocol}",
        f"- processing resolution {inference['processing_resolution'] or 'native'}, mask threshold "
        f"{inference['mask_threshold']}, background threshold {inference['background_threshold']}, dtype "
        f"{inference['dtype']}, seed {inference['seed']}, {results['num_processes']} process(es)",
        "",
        "## Summary (%)",
        "",
    ]
    summary = []
    for name, s in settings.items():
        curve = s["iou_vs_threshold"]
        best = "n/a"
        if curve["best_threshold"] is not None:
            best = f"{curve['best_threshold']:.2f} ({_pct(curve['best_mean_iou'])})"
        seconds = "n/a" if s["seconds_per_image"] is None else f"{s['seconds_per_image']:.3f}"
        summary.append([name, *(_pct(s[key]) for key in SUMMARY_COLUMNS), best, seconds])
    lines += _table(["setting (E x S)", *SUMMARY_COLUMNS.values(), "best threshold (mean IoU)", "s / image"], summary)
    first = next(iter(settings.values()))
    if "binary" in first:
        rows = [[name, *(_pct(s["binary"][key]) for key in BINARY_COLUMNS)] for name, s in settings.items()]
        lines += ["", "## Binary scores (%)", "", *_table(["setting", *BINARY_COLUMNS.values()], rows)]
    if "proposal" in first:
        p = first["proposal"]
        lines += [
            "",
            "## Class proposal",
            "",
            f"{p['mean_classes_per_image']:.2f} classes proposed per image; recall {_pct(p['recall'])} % of the "
            f"classes present, precision {_pct(p['precision'])} %; {p['images_without_proposal']} image(s) without a "
            "proposal (predicted as background).",
        ]
    rows = [
        [name, first["per_class"][name]["pixels"], *(_pct(s["per_class"][name]["iou"]) for s in settings.values())]
        for name in first["per_class"]
    ]
    lines += ["", "## Per-class IoU (%)", "", *_table(["class", "pixels", *settings], rows)]
    lines += ["", "## Plots", ""]
    if charts:
        lines += [f"![IoU against the mask threshold]({CURVE_PLOT_NAME})", ""]
        lines += [f"![Per-class IoU, setting {name}](per_class_iou_{name}.png)" for name in settings]
    else:
        lines.append(CHARTS_INSTALL_HINT)
    lines += [
        "",
        "n/a: undefined (the class appears neither in the ground truth nor in the prediction); left out of the means.",
        "",
    ]
    return "\n".join(lines)


def _agg_figure(size: tuple[int, int]):
    """A matplotlib figure on the Agg canvas, without pyplot: no global figure state, no display needed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(CHARTS_INSTALL_HINT) from error
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: str | os.PathLike) -> None:
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png")


def plot_lines(
    path: str | os.PathLike,
    x_values: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    x_label: str = "mask threshold t",
    y_label: str = "IoU",
    size: tuple[int, int] = (640, 420),
    highlight: str | None = None,
) -> None:
    """Lines of values in [0, 1] against x in [0, 1], one per series (None / NaN points left out); the
    `highlight` series is drawn black and thicker (e.g. the mean over classes). `size` is in pixels."""
    figure = _agg_figure(size)
    axes = figure.add_subplot()
    for name, values in series.items():
        style = {"color": "black", "linewidth": 3} if name == highlight else {"linewidth": 1.5}
        y_values = [float("nan") if v is None else v for v in values]
        axes.plot(x_values, y_values, marker="o", markersize=3, label=name, **style)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel=x_label, ylabel=y_label, title=title)
    axes.grid(color="0.9")
    if len(series) > 1:
        axes.legend(fontsize="small")
    _save_png(figure, path)


def plot_iou_vs_threshold(results: dict, path: str | os.PathLike, size: tuple[int, int] = (640, 420)) -> None:
    """Mean IoU (over classes) of ``probability > t`` masks against t, one line per evaluation setting."""
    settings = results["settings"]
    thresholds = next(iter(settings.values()))["iou_vs_threshold"]["thresholds"]
    series = {name: values["iou_vs_threshold"]["mean_iou"] for name, values in settings.items()}
    plot_lines(path, thresholds, series, "IoU of (probability > t) against t", y_label="mean IoU", size=size)


def plot_per_class_iou(setting_results: dict, path: str | os.PathLike, title: str, width: int = 640) -> None:
    """Horizontal bars of per-class IoU, best first; undefined classes (n/a) at the end. 18 pixels per class."""
    rows = [(name, v["iou"]) for name, v in setting_results["per_class"].items()]
    rows.sort(key=lambda row: (row[1] is None, -(row[1] or 0.0)))
    figure = _agg_figure((width, 70 + 18 * len(rows)))
    axes = figure.add_subplot()
    labels = [name if len(name) <= 32 else name[:31] + "…" for name, _ in rows]
    bars = axes.barh(range(len(rows)), [max(iou or 0.0, 0.0) for _, iou in rows])
    axes.set_yticks(range(len(rows)), labels)
    axes.bar_label(bars, ["n/a" if iou is None else f"{100 * iou:.1f}" for _, iou in rows], padding=3, fontsize=8)
    axes.set(xlim=(0, 1), title=title)
    axes.invert_yaxis()  # best first, at the top
    axes.tick_params(labelsize=8)
    axes.grid(axis="x", color="0.9")
    _save_png(figure, path)
