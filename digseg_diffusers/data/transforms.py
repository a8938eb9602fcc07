"""Geometric training augmentation shared by every dataset: flip, scale jitter, crop/pad to a square.

The image is resampled bilinearly and the label map with nearest neighbour (a blended label id would be a
different class). Both use pixel-centre coordinates, so they stay aligned. Padding of the label map uses the
ignore index: padded pixels are excluded from the loss.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an ``uint8`` ``[H, W, 3]`` image."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_label_nearest(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a ``[H, W]`` label map, sampling at pixel centres."""
    src_height, src_width = label.shape
    if (src_height, src_width) == (height, width):
        return label
    rows = np.minimum(((np.arange(height) + 0.5) * src_height / height).astype(np.int64), src_height - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * src_width / width).astype(np.int64), src_width - 1)
    return label[rows[:, None], cols[None, :]]


def crop_is_fixed(
    height: int,
    width: int,
    resolution: int,
    scale_range: tuple[float, float],
    flip_prob: float,
    resize_short_side: bool = True,
) -> bool:
    """Whether :func:`random_scale_flip_crop` gives the same crop of a ``height`` x ``width`` image every time.

    True when nothing is drawn: no scale jitter, no flip, and the scaled image is exactly ``resolution`` square
    (no crop window or paste offset to choose). Such samples may have their VAE latents cached across epochs.
    """
    if augmentation_is_random(scale_range, flip_prob):
        return False
    return _scaled_size(height, width, scale_range[0], resolution, resize_short_side) == (resolution, resolution)


def augmentation_is_random(scale_range: tuple[float, float], flip_prob: float) -> bool:
    """Whether :func:`random_scale_flip_crop` draws a scale or a flip (else only the crop window can vary)."""
    return scale_range[0] != scale_range[1] or flip_prob > 0


def _scaled_size(height: int, width: int, scale: float, resolution: int, resize_short_side: bool) -> tuple[int, int]:
    """Size of the image after scaling by ``scale`` (relative to a short side of ``resolution`` if asked)."""
    if resize_short_side:
        scale *= resolution / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def random_scale_flip_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    resolution: int,
    ignore_index: int,
    scale_range: tuple[float, float] = (0.8, 1.2),
    flip_prob: float = 0.5,
    resize_short_side: bool = True,
    image_pad_value: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale (uniform in `scale_range`), horizontal flip, then a random ``resolution`` square crop of an
    ``uint8 [H, W, 3]`` image and its ``[H, W]`` label; where the scaled image is smaller it is padded with
    `image_pad_value` and `ignore_index`. `rng` is the only source of randomness (per-sample generators make samples
    reproducible). `resize_short_side` scales relative to a short side of ``resolution`` (so a 2048x1024 Cityscapes
    frame and a 512x683 ADE20K image give crops of similar content) instead of the native size.
    """
    height, width = label.shape
    new_height, new_width = _scaled_size(height, width, rng.uniform(*scale_range), resolution, resize_short_side)
    image = resize_image(image, new_height, new_width)
    label = resize_label_nearest(label, new_height, new_width)
    if rng.random() < flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]

    out_image = np.full((resolution, resolution, 3), image_pad_value, dtype=np.uint8)
    out_label = np.full((resolution, resolution), ignore_index, dtype=label.dtype)
    # Along each axis: crop a random window when larger, paste at a random offset when smaller.
    src_rows, dst_rows = _window(new_height, resolution, rng)
    src_cols, dst_cols = _window(new_width, resolution, rng)
    out_image[dst_rows, dst_cols] = image[src_rows, src_cols]
    out_label[dst_rows, dst_cols] = label[src_rows, src_cols]
    return out_image, out_label


def _window(length: int, resolution: int, rng: np.random.Generator) -> tuple[slice, slice]:
    """(source, destination) slices along one axis."""
    if length >= resolution:
        start = int(rng.integers(0, length - resolution + 1))
        return slice(start, start + resolution), slice(0, resolution)
    start = int(rng.integers(0, resolution - length + 1))
    return slice(0, length), slice(start, start + length)
