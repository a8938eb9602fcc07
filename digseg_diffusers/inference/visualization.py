"""Colours for DiGSeg label maps: one fixed palette shared by the CLI, the ComfyUI nodes and the demos, so every
front end draws the same class in the same colour (label 0 = background, black; label k + 1 = prompt k).
numpy and PIL only: no framework import.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

__all__ = ["BASE_COLORS", "label_colors", "colorize_label_map", "overlay", "legend_image", "titled_row"]

BASE_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (250, 190, 212),  # pink
    (0, 128, 128),  # teal
    (220, 190, 255),  # lavender
    (170, 110, 40),  # brown
    (255, 250, 200),  # beige
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (255, 215, 180),  # apricot
    (0, 0, 128),  # navy
    (128, 128, 128),  # grey
)
"""Colours of prompts 0..19 (labels 1..20): high-contrast first, so few-prompt results are easy to read."""

IGNORE_COLOR = (255, 255, 255)
"""Colour of `ignore_index` pixels (ground-truth maps mark unlabelled pixels with 255)."""


def label_colors(num_classes: int) -> np.ndarray:
    """The palette for labels ``0..num_classes``: ``uint8 [num_classes + 1, 3]``, row 0 = background (black).

    Beyond the 20 base colours, hues follow the golden angle so that any number of classes (A-847 has 847)
    gets distinct, deterministic colours.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
        raise ValueError(f"`num_classes` must be a non-negative integer; got {num_classes!r}.")
    colors = np.zeros((int(num_classes) + 1, 3), dtype=np.uint8)
    for k in range(int(num_classes)):
        if k < len(BASE_COLORS):
            colors[k + 1] = BASE_COLORS[k]
        else:
            j = k - len(BASE_COLORS)
            hue = (j * 0.618033988749895) % 1.0
            saturation = 0.55 + 0.45 * ((j // 3) % 2)
            value = 0.65 + 0.35 * (j % 2)
            colors[k + 1] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0)
    return colors


LABEL_PNG_ENCODINGS = ("auto", "palette", "16bit")


def label_map_image(label_map, num_classes: int, encoding: str = "auto") -> Image.Image:
    """A ``[H, W]`` label map as a PIL image to save losslessly as PNG: pixel value = label.

    "palette": 8-bit "P" image coloured with `label_colors` (viewers show colours, readers get the labels;
    up to 255 prompts); "16bit": 16-bit grayscale "I;16" (up to 65535 prompts; looks black in viewers);
    "auto": palette when the labels fit, else 16-bit.
    """
    if encoding not in LABEL_PNG_ENCODINGS:
        raise ValueError(f"label PNG encoding must be one of {LABEL_PNG_ENCODINGS}; got {encoding!r}.")
    labels = np.asarray(label_map)
    if encoding == "auto":
        encoding = "palette" if num_classes <= 255 else "16bit"
    if encoding == "palette":
        if num_classes > 255:
            raise ValueError(f"a palette PNG holds labels up to 255; {num_classes} prompts need the 16-bit encoding.")
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(label_colors(num_classes).reshape(-1).tolist())
        return image
    if num_classes > 65535:
        raise ValueError(f"a 16-bit PNG holds labels up to 65535; got {num_classes} prompts.")
    return Image.fromarray(labels.astype(np.uint16))


def _as_label_array(label_map) -> np.ndarray:
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"`label_map` must be a 2-D [H, W] array; got shape {labels.shape}.")
    if labels.dtype == bool or not (
        np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
    ):
        raise ValueError(f"`label_map` must hold integer labels; got dtype {labels.dtype}.")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise ValueError("`label_map` is float but holds non-integer values; pass integer labels.")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"`label_map` has negative labels (min {labels.min()}); labels are 0 (background) or k + 1.")
    return labels


def colorize_label_map(label_map, num_classes: int | None = None, ignore_index: int | None = 255) -> np.ndarray:
    """Paint a ``[H, W]`` label map (0 = background, k + 1 = prompt k) as an ``[H, W, 3]`` uint8 RGB image.

    A label above `num_classes` (default: the largest present) is an error: the map does not match its prompt list.
    `ignore_index` pixels are painted white when ``num_classes < ignore_index`` (ground-truth "unlabelled" pixels).
    """
    labels = _as_label_array(label_map)
    ignored = np.zeros(labels.shape, dtype=bool)
    if ignore_index is not None and (num_classes is None or num_classes < ignore_index):
        ignored = labels == ignore_index
        labels = np.where(ignored, 0, labels)
    largest = int(labels.max()) if labels.size else 0
    if num_classes is None:
        num_classes = largest
    elif largest > num_classes:
        raise ValueError(f"`label_map` has label {largest} but `num_classes` is {num_classes} (labels are 0..K).")
    rgb = label_colors(num_classes)[labels]
    rgb[ignored] = IGNORE_COLOR
    return rgb


def overlay(image_uint8, label_map, alpha: float = 0.5, num_classes: int | None = None) -> np.ndarray:
    """Blend the label colours (weight `alpha`) onto an image; background pixels (label 0) keep the image unchanged.

    `image_uint8` may be ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` (alpha dropped) uint8, a PIL image of any mode, or
    a uint16 / float-in-[0, 1] array (rescaled to 8 bits, never clipped). Returns ``[H, W, 3]`` uint8.
    """
    image = image_uint8 if isinstance(image_uint8, Image.Image) else np.asarray(image_uint8)
    if isinstance(image, Image.Image) or image.dtype != np.uint8:
        try:
            from digseg_diffusers.image_processing import to_uint8_rgb  # imported here: it needs torch, the palette helpers do not

            image = to_uint8_rgb(image)
        except ValueError as error:
            raise ValueError(f"`image_uint8`: {error}") from None
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"`image_uint8` must be [H, W], [H, W, 3] or [H, W, 4]; got shape {image.shape}.")
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must lie in [0, 1]; got {alpha}.")
    labels = _as_label_array(label_map)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"`label_map` is {labels.shape} but the image is {image.shape[:2]} (H, W); they must match.")
    colors = colorize_label_map(labels, num_classes, ignore_index=None).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    foreground = (labels != 0)[:, :, None]
    return np.where(foreground, np.round(blended), image).astype(np.uint8)


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def legend_image(names, width: int, swatch: int = 14, padding: int = 6) -> Image.Image:
    """A white strip naming each label's colour: ``names[0]`` is label 0 (background), ``names[k]`` label k,
    coloured as in `label_colors`; entries wrap onto new rows to fit `width` pixels. PIL's default font."""
    from PIL import ImageDraw, ImageFont

    names = [str(name) for name in names]
    colors = label_colors(max(len(names) - 1, 0))
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(swatch + 4 + _text_size(measure, name, font)[0], name) for name in names]
    line = max([swatch] + [_text_size(measure, name, font)[1] for name in names]) + padding
    rows, x = [[]], padding
    for entry_width, name in entries:
        if rows[-1] and x + entry_width > width - padding:
            rows.append([])
            x = padding
        rows[-1].append((x, name))
        x += entry_width + 2 * padding
    legend = Image.new("RGB", (max(width, 1), len(rows) * line + padding), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    k = 0
    for r, row in enumerate(rows):
        top = padding + r * line
        for x, name in row:
            draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], fill=tuple(int(c) for c in colors[k]), outline=(0, 0, 0))
            draw.text((x + swatch + 4, top + (swatch - _text_size(measure, name, font)[1]) // 2), name, fill=(0, 0, 0), font=font)
            k += 1
    return legend


def titled_row(tiles, titles, gap: int = 4, padding: int = 4) -> Image.Image:
    """``[H, W, 3]`` uint8 tiles of one height side by side on white, each with its title above it."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_height = max(_text_size(measure, title, font)[1] for title in titles) + 2 * padding
    height = max(np.asarray(tile).shape[0] for tile in tiles)
    width = sum(np.asarray(tile).shape[1] for tile in tiles) + gap * (len(tiles) - 1)
    row = Image.new("RGB", (width, height + title_height), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    left = 0
    for tile, title in zip(tiles, titles):
        tile = np.asarray(tile)
        draw.text((left + (tile.shape[1] - _text_size(measure, title, font)[0]) // 2, padding), title, fill=(0, 0, 0), font=font)
        row.paste(Image.fromarray(tile), (left, title_height))
        left += tile.shape[1] + gap
    return row
