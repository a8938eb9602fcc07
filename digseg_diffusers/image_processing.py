"""Input canonicalisation for DiGSeg: any common image form -> float ``[N, 3, H, W]`` in [0, 1].

Resizing, padding to the VAE's multiple and un-padding are Marigold's (diffusers' `MarigoldImageProcessor`);
this subclass only widens what it accepts: RGBA / LA (alpha dropped), palette, 16-bit and 32-bit integer
PIL images, and 4-channel arrays, so that users never have to convert an image before segmenting it.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from PIL import Image

RESAMPLE_METHODS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> HxW or HxWxC array with an unsigned or float dtype that says its value range."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return np.asarray(image)
    if mode in ("RGBA", "RGBa", "LA", "La", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        return np.asarray(image.convert("L" if mode in ("LA", "La", "1") else "RGB"))
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":  # 16-bit PNGs often open as 32-bit "I"; their values still fit 16 bits
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ValueError(f"32-bit integer image with values outside [0, 65535] (mode {mode!r}) is not supported.")
        return array.astype(np.uint16)
    if mode == "F":
        return np.asarray(image).astype(np.float32)
    return np.asarray(image.convert("RGB"))


class DiGSegImageProcessor(MarigoldImageProcessor):
    """Marigold's image processor, accepting more image kinds (see module docstring)."""

    @staticmethod
    def load_image_canonical(
        image: torch.Tensor | np.ndarray | Image.Image,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = _pil_to_array(image)
        if isinstance(image, np.ndarray):
            if image.ndim in (3, 4) and image.shape[-1] in (2, 4):  # HWC / NHWC with alpha: drop it
                image = image[..., : image.shape[-1] - 1]
            if image.dtype.kind == "f" and image.dtype != np.float32:
                image = image.astype(np.float32)
        elif torch.is_tensor(image):
            if image.ndim in (3, 4) and image.shape[-3] in (2, 4):  # CHW / NCHW with alpha: drop it
                image = image[..., : image.shape[-3] - 1, :, :]
        return MarigoldImageProcessor.load_image_canonical(image, device=device, dtype=dtype)
