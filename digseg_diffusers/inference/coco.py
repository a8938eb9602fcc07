"""COCO run-length encoding of binary masks, byte-compatible with pycocotools (no dependency on it).

A COCO RLE is ``{"size": [height, width], "counts": ...}``: the mask is read in column-major (Fortran) order and
``counts`` holds the lengths of alternating runs, starting with a run of zeros (possibly of length 0). pycocotools
stores ``counts`` either as a list of integers ("uncompressed") or as a compressed ASCII string; `encode_rle`
always writes the compressed string, exactly the one `pycocotools.mask.encode` gives (as `str`, not `bytes`, so
that it goes into JSON as is); `decode_rle` reads both forms. An annotations file built from these loads with
``pycocotools.coco.COCO`` and its ``annToMask``.
"""

from __future__ import annotations

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a 2-D binary mask, starting with the (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def compress_counts(counts: list[int]) -> str:
    """pycocotools' ``rleToString``: each count (a difference to the count two back, from the third on) is
    written 5 bits per character, least significant first, bit 0x20 meaning "more follows", offset by 48."""
    characters = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5  # arithmetic shift: negative differences end at -1
            more = value != -1 if chunk & 0x10 else value != 0
            if more:
                chunk |= 0x20
            characters.append(chr(chunk + 48))
    return "".join(characters)


def decompress_counts(text: str | bytes) -> list[int]:
    """The inverse of `compress_counts` (pycocotools' ``rleFrString``)."""
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("truncated COCO RLE string")
            chunk = data[position] - 48
            value |= (chunk & 0x1F) << (5 * shift)
            more = bool(chunk & 0x20)
            position += 1
            shift += 1
            if not more and chunk & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_rle(mask: np.ndarray) -> dict:
    """A 2-D binary mask -> ``{"size": [h, w], "counts": "<compressed string>"}`` (pycocotools' format)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": compress_counts(rle_counts(mask))}


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE (compressed string or uncompressed list of counts) -> ``[h, w]`` bool mask."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise ValueError("a COCO RLE is a dict with 'size': [height, width] and 'counts'") from None
    counts = list(counts) if isinstance(counts, (list, tuple)) else decompress_counts(counts)
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"COCO RLE counts sum to {sum(counts)}, expected {height} x {width} = {height * width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")


def rle_area(rle: dict) -> int:
    """Number of foreground pixels of a COCO RLE."""
    counts = rle["counts"]
    counts = list(counts) if isinstance(counts, (list, tuple)) else decompress_counts(counts)
    return int(sum(counts[1::2]))


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO bounding box ``[x, y, width, height]`` of a binary mask (all zeros for an empty mask)."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
