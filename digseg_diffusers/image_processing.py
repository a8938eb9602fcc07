"""Input canonicalisation for DiGSeg: any common image form -> float ``[N, 3, H, W]`` in [0, 1].

Resizing and (un)padding are Marigold's (diffusers' `MarigoldImageProcessor`); this subclass widens what it
accepts (RGBA / LA with alpha dropped, palette, CMYK, 16- and 32-bit integer PIL images, 4-channel arrays) and
keeps a short side that would shrink below one pixel at one pixel. It is the one place that turns images into
pixels (pipeline, CLI, dataset readers, visualisation), so a 16-bit file gives the masks of its 8-bit version
everywhere (PIL's ``.convert("RGB")`` clips 16-bit values). Integers are read by dtype, as diffusers does:
``uint8`` as value / 255, ``uint16`` as value / 65535; floats must lie in [0, 1]. Other integer dtypes are refused:
a ``uint32`` array holding 0..255 would silently read as black.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
from diffusers import AutoencoderTiny
from diffusers.pipelines.marigold.marigold_image_processing import MarigoldImageProcessor
from PIL import Image, UnidentifiedImageError

RESAMPLE_METHODS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


INTEGER_SCALES = {"uint8": 255, "uint16": 65535}
"""Integer pixel dtypes that are read, and the value that reads as 1.0 (the dtype's maximum)."""


def _check_integer_dtype(dtype: np.dtype | torch.dtype) -> None:
    """Refuse integer pixels of a dtype other than `INTEGER_SCALES`' (see the module docstring)."""
    name = str(dtype).removeprefix("torch.")
    signed = (dtype.is_signed if isinstance(dtype, torch.dtype) else np.dtype(dtype).kind == "i") and name != "bool"
    refused = "signed " if signed else ""
    raise ValueError(
        f"integer pixels are read as uint8 (value / 255) or uint16 (value / 65535); got {refused}{name}. Convert the "
        "image (e.g. `.astype(np.uint8)` for values 0..255) or pass floats in [0, 1]."
    )


def _decode(image: Image.Image) -> None:
    """Decode a lazily opened PIL image now, so a truncated or corrupt file is a `ValueError` naming it."""
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError, zlib.error) as error:
        name = getattr(image, "filename", "") or f"the {image.format or 'PIL'} image"
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"cannot read image {name}: {reason} (the file is truncated or corrupt)") from None


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> HxW or HxWxC array with an unsigned or float dtype that says its value range."""
    _decode(image)
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
    """Marigold's image processor, accepting more image kinds and extreme aspect ratios (see module docstring)."""

    def canonical_batch(self, image) -> torch.Tensor:
        """Any supported image input -> float ``[N, 3, H, W]`` in [0, 1]; ValueErrors name the offending image."""
        if image is None:
            raise ValueError("`image` is required.")
        images = image if isinstance(image, list) else [image]
        if len(images) == 0:
            raise ValueError("`image` is an empty list.")
        tensors = []
        for i, img in enumerate(images):
            tensor = canonical_image(img, f"`image[{i}]`")
            if tensors and tensor.shape[-2:] != tensors[0].shape[-2:]:
                raise ValueError(
                    f"`image[{i}]` is {tuple(tensor.shape[-2:])} (H, W) but `image[0]` is "
                    f"{tuple(tensors[0].shape[-2:])}: images of one call must share a size; call once per size."
                )
            tensors.append(tensor)
        return torch.cat(tensors, dim=0)

    @staticmethod
    def resize_to_max_edge(image: torch.Tensor, max_edge_sz: int, mode: str) -> torch.Tensor:
        """Marigold's resize of the longest side to `max_edge_sz`, with the short side kept at >= 1 pixel.

        A 4097 x 3 strip would shrink to 512 x 0 and Marigold refuses it; here it becomes 512 x 1 and padding to the
        VAE's multiple does the rest, like any other odd size.
        """
        height, width = image.shape[-2:]
        new_size = processing_size((height, width), max_edge_sz)
        if new_size == (height, width):
            return image
        return MarigoldImageProcessor.resize_antialias(image, new_size, mode, is_aa=True)

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
            elif image.dtype.kind in "iu" and image.dtype.name not in INTEGER_SCALES:
                _check_integer_dtype(image.dtype)
        elif torch.is_tensor(image):
            if image.ndim in (3, 4) and image.shape[-3] in (2, 4):  # CHW / NCHW with alpha: drop it
                image = image[..., : image.shape[-3] - 1, :, :]
            if image.dtype == torch.uint16:  # Marigold reads only uint8 tensors; same rule as for arrays
                image = image.to(torch.float32) / INTEGER_SCALES["uint16"]
            elif not image.is_floating_point() and not image.is_complex() and image.dtype != torch.uint8:
                _check_integer_dtype(image.dtype)
        return MarigoldImageProcessor.load_image_canonical(image, device=device, dtype=dtype)


def canonical_image(image, name: str) -> torch.Tensor:
    """One image (or a batch) of any supported form -> float ``[N, 3, H, W]`` in [0, 1]; errors start with ``name``."""
    if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} has unsupported type {type(image).__name__}; use PIL, numpy or torch.")
    try:
        pixels = DiGSegImageProcessor.load_image_canonical(image)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if pixels.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(pixels.shape)}.")
    try:
        check_unit_range(pixels)
    except ValueError as error:
        raise ValueError(f"{name}: {error}.") from None
    return pixels


def processing_size(image_size: tuple[int, int], processing_resolution: int) -> tuple[int, int]:
    """``(H, W)`` after resizing the longest side to `processing_resolution` (0 = native), each side >= 1."""
    height, width = image_size
    if processing_resolution <= 0:
        return height, width
    longest = max(height, width)
    return max(1, height * processing_resolution // longest), max(1, width * processing_resolution // longest)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; a `ValueError` names the file when it is missing, empty, truncated,
    too large for PIL's decompression-bomb guard, or not an image. EXIF rotation is not applied (label maps and
    masks stay on the file's pixel grid)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read image {path}: the file is empty (0 bytes)")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"cannot read image {path}: {reason}") from None
    _decode(image)  # now: truncated or corrupt files raise here, not later inside the pipeline
    return image


def check_unit_range(pixels: torch.Tensor) -> None:
    """Refuse pixels outside [0, 1] (NaN and inf included): what every canonical image must satisfy."""
    if pixels.numel() and (torch.isnan(pixels).any() or pixels.min() < 0.0 or pixels.max() > 1.0):
        raise ValueError("float pixel values must lie in [0, 1]")


def to_float_rgb(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """One image (any form the pipeline accepts) -> ``[H, W, 3]`` float32 in [0, 1], full precision kept."""
    pixels = DiGSegImageProcessor.load_image_canonical(image)
    if pixels.shape[0] != 1:
        raise ValueError(f"expected one image, got a batch of {pixels.shape[0]}")
    return pixels[0].permute(1, 2, 0).numpy()


def to_uint8_rgb(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """One image -> ``[H, W, 3]`` uint8: 16-bit and float images are rescaled (never clipped to 0 / 255)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    pixels = to_float_rgb(image)
    check_unit_range(torch.from_numpy(pixels))
    return np.round(pixels * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- post-processing

BACKGROUND_LABEL = 0
"""Label-map value of pixels where no prompt scores above `background_threshold`; prompt k is labelled k + 1."""


def label_map_from_best(best: torch.Tensor, best_index: torch.Tensor, background_threshold: float) -> torch.Tensor:
    """The labelling rule: 1 + the best prompt (`best_index`, its probability `best`) where that probability
    reaches `background_threshold`, else `BACKGROUND_LABEL`."""
    return torch.where(best >= background_threshold, best_index + 1, BACKGROUND_LABEL).long()


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel: 2 ** (number of VAE blocks - 1); 8 for Stable Diffusion's VAEs."""
    if vae is None:
        return 8
    if isinstance(vae, AutoencoderTiny):
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


PROBABILITY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


def probability_values(probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Probabilities in [0, 1] as float32, float16, or uint8 ``round(255 p)`` (4x less memory than float32)."""
    if dtype == torch.uint8:
        return (probs * 255.0).round_().to(torch.uint8)
    return probs.to(dtype)


def uint8_probabilities(probs: np.ndarray) -> np.ndarray:
    return probs if probs.dtype == np.uint8 else (probs.astype(np.float32) * 255.0).round().astype(np.uint8)


def convert_outputs(items: list[torch.Tensor], output_type: str, kind: str) -> list:
    """Per-image tensors -> the requested output type."""
    if output_type == "pt":
        return [item.cpu() for item in items]
    arrays = [item.cpu().numpy() for item in items]
    if output_type == "np":
        return arrays
    if kind == "probability":  # uint8 maps already are round(255 p)
        return [[Image.fromarray(uint8_probabilities(m), mode="L") for m in a] for a in arrays]
    if kind == "mask":
        return [[Image.fromarray(m.astype(np.uint8) * 255, mode="L") for m in a] for a in arrays]
    return [Image.fromarray(a.astype(np.uint8 if a.max(initial=0) < 256 else np.uint16)) for a in arrays]
