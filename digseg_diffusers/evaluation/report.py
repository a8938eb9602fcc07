"""Evaluation reports: the JSON results, a markdown summary and PNG plots (PIL only, no matplotlib).

`training/evaluate.py` writes them for a dataset evaluation (`write_evaluation_report`); `plot_lines` is the one
line plot of the project (IoU against the mask threshold here and in `benchmarks/quality/demo_fidelity.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "RESULTS_NAME",
    "REPORT_NAME",
    "CURVE_PLOT_NAME",
    "write_evaluation_report",
    "markdown_report",
    "plot_lines",
    "plot_iou_vs_threshold",
    "plot_per_class_iou",
]

RESULTS_NAME = "evaluation.json"
REPORT_NAME = "evaluation.md"
CURVE_PLOT_NAME = "iou_vs_threshold.png"
PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def write_evaluation_report(results: dict, output_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``evaluation.json``, ``evaluation.md`` and the plots of `results` (training/evaluate.py's
    document) into `output_dir`; returns their paths by kind."""
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, RESULTS_NAME), "markdown": os.path.join(output_dir, REPORT_NAME)}
    paths["iou_vs_threshold"] = os.path.join(output_dir, CURVE_PLOT_NAME)
    plot_iou_vs_threshold(results, paths["iou_vs_threshold"])
    for name, values in results["settings"].items():
        paths[f"per_class_iou_{name}"] = os.path.join(output_dir, f"per_class_iou_{name}.png")
        plot_per_class_iou(values, paths[f"per_class_iou_{name}"], title=f"Per-class IoU, setting {name}")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    Path(paths["markdown"]).write_text(markdown_report(results), encoding="utf-8")
    return paths


def _pct(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}"


def markdown_report(results: dict) -> str:
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
        "| setting (E x S) | mIoU | pixel acc. | mean acc. | mean Dice | best threshold (mean IoU) | s / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in settings.items():
        curve = s["iou_vs_threshold"]
        best = "n/a"
        if curve["best_threshold"] is not None:
            best = f"{curve['best_threshold']:.2f} ({_pct(curve['best_mean_iou'])})"
        seconds = "n/a" if s["seconds_per_image"] is None else f"{s['seconds_per_image']:.3f}"
        lines.append(
            f"| {name} | {_pct(s['mIoU'])} | {_pct(s['pixel_accuracy'])} | {_pct(s['mean_accuracy'])} | "
            f"{_pct(s['mean_dice'])} | {best} | {seconds} |"
        )
    first = next(iter(settings.values()))
    if "binary" in first:
        lines += ["", "## Binary scores (%)", "", "| setting | IoU | precision | recall | F1 | Dice |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for name, s in settings.items():
            b = s["binary"]
            scores = " | ".join(_pct(b[key]) for key in ("iou", "precision", "recall", "f1", "dice"))
            lines.append(f"| {name} | {scores} |")
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
    names = list(first["per_class"])
    lines += ["", "## Per-class IoU (%)", "", "| class | pixels | " + " | ".join(settings) + " |"]
    lines.append("| --- | --- | " + " | ".join("---" for _ in settings) + " |")
    for class_name in names:
        row = [_pct(s["per_class"][class_name]["iou"]) for s in settings.values()]
        lines.append(f"| {class_name} | {first['per_class'][class_name]['pixels']} | " + " | ".join(row) + " |")
    lines += ["", "## Plots", "", f"![IoU against the mask threshold]({CURVE_PLOT_NAME})", ""]
    lines += [f"![Per-class IoU, setting {name}](per_class_iou_{name}.png)" for name in settings]
    lines += [
        "",
        "n/a: undefined (the class appears neither in the ground truth nor in the prediction); left out of the means.",
        "",
    ]
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


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
    `highlight` series is drawn black and thicker (e.g. the mean over classes)."""
    width, height = size
    legend_width = 120 if len(series) > 1 else 0
    left, right, top, bottom = 60, 20 + legend_width, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)

    def xy(t: float, value: float) -> tuple[float, float]:
        return left + t * (width - left - right), top + (1.0 - value) * (height - top - bottom)

    for i in range(6):  # grid and ticks at 0, 0.2, ..., 1
        v = i / 5
        x, _ = xy(v, 0)
        _, y = xy(0, v)
        draw.line([xy(0, v), xy(1, v)], fill=(225, 225, 225))
        draw.line([xy(v, 0), xy(v, 1)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{v:.1f}", fill="black", font=small, anchor="rm")
        draw.text((x, height - bottom + 8), f"{v:.1f}", fill="black", font=small, anchor="mt")
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.text(((left + width - right) / 2, height - 14), x_label, fill="black", font=font, anchor="mm")
    draw.text((12, top - 22), y_label, fill="black", font=font, anchor="lm")
    draw.text((width / 2, 14), title, fill="black", font=font, anchor="mm")
    for k, (name, values) in enumerate(series.items()):
        color = (0, 0, 0) if name == highlight else PLOT_COLORS[k % len(PLOT_COLORS)]
        points = [xy(t, v) for t, v in zip(x_values, values) if v is not None and v == v]
        if len(points) > 1:
            draw.line(points, fill=color, width=4 if name == highlight else 2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if legend_width:
            legend_x, legend_y = width - legend_width, top + 12 + 18 * k
            draw.line([(legend_x, legend_y), (legend_x + 25, legend_y)], fill=color, width=3)
            draw.text((legend_x + 32, legend_y), name, fill="black", font=small, anchor="lm")
    image.save(path)


def plot_iou_vs_threshold(results: dict, path: str | os.PathLike, size: tuple[int, int] = (640, 420)) -> None:
    """Mean IoU (over classes) of ``probability > t`` masks against t, one line per evaluation setting."""
    settings = results["settings"]
    thresholds = next(iter(settings.values()))["iou_vs_threshold"]["thresholds"]
    series = {name: values["iou_vs_threshold"]["mean_iou"] for name, values in settings.items()}
    plot_lines(path, thresholds, series, "IoU of (probability > t) against t", y_label="mean IoU", size=size)


def plot_per_class_iou(setting_results: dict, path: str, title: str, width: int = 640) -> None:
    """Horizontal bars of per-class IoU, best first; undefined classes (n/a) at the end."""
    rows = [(name, v["iou"]) for name, v in setting_results["per_class"].items()]
    rows.sort(key=lambda row: (row[1] is None, -(row[1] or 0.0)))
    font, small = _font(14), _font(11)
    row_height, top, bottom = 18, 40, 30
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = min(220, 12 + max(int(measure.textlength(name, font=small)) for name, _ in rows))
    bar_left, bar_right = label_width + 10, width - 60
    height = top + bottom + row_height * len(rows)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 16), title, fill="black", font=font, anchor="mm")
    for i in range(6):
        x = bar_left + i / 5 * (bar_right - bar_left)
        draw.line([(x, top - 4), (x, height - bottom)], fill=(225, 225, 225))
        draw.text((x, height - bottom + 6), f"{i / 5:.1f}", fill="black", font=small, anchor="mt")
    for k, (name, iou) in enumerate(rows):
        y = top + k * row_height
        label = name if len(name) <= 32 else name[:31] + "…"
        draw.text((bar_left - 6, y + row_height / 2), label, fill="black", font=small, anchor="rm")
        if iou is None:
            draw.text((bar_left + 4, y + row_height / 2), "n/a", fill=(150, 150, 150), font=small, anchor="lm")
            continue
        x = bar_left + max(iou, 0.0) * (bar_right - bar_left)
        draw.rectangle([bar_left, y + 3, max(x, bar_left + 1), y + row_height - 3], fill=PLOT_COLORS[0])
        draw.text((x + 4, y + row_height / 2), f"{100 * iou:.1f}", fill="black", font=small, anchor="lm")
    draw.line([(bar_left, top - 4), (bar_left, height - bottom)], fill="black")
    image.save(path)
