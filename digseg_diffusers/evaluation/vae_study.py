"""How faithfully a VAE round-trips segmentation masks (the paper's Table 7 study, method.md section 2): what the
VAE loses in ``encode -> decode`` is an error floor no U-Net training can remove. Measured through `mask_codec`,
as training targets and inference outputs go:

- ``mae``: mean absolute error between the decoded mask probabilities (codec output, [0, 1]) and the binary
  input mask, per mask, reported as mean and std over masks (the paper's "0.0041 +- 0.0037");
- ``mae_pixel_space``: the same in the VAE's own [-1, 1] RGB space over all three channels (unclamped);
- ``channel_std`` / ``channel_max_min``: per pixel, the population std and the max - min of the three decoded
  channels (which should be identical for a grey input), averaged over pixels (the paper's Table 7 columns);
  ``channel_max_min_worst`` is the largest spread at any pixel;
- ``iou``: IoU of ``probability > threshold`` against the input mask, pooled over all masks (``mean_mask_iou``
  averages per-mask IoUs instead).

The paper encodes whole label maps (matching colours to a palette); DiGSeg only ever encodes binary masks, so
those are measured. The light mask decoder is set against the VAE decoder on the same kind of masks
(`synthetic_class_masks`, `decode_flops`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from digseg_diffusers.data.synthetic import generate_scene, split_seeds
from digseg_diffusers.evaluation.metrics import ConfusionMatrix, binary_segmentation_metrics
from digseg_diffusers.mask_codec import decode_mask_channels, decode_masks, encode_masks, mask_channels_to_probabilities
from digseg_diffusers.mask_decoder import count_flops

LABEL_MAP_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def generate_random_masks(num_masks: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``[N, H, W]`` float masks in {0, 1}, each the union of 1-3 random ellipses and rectangles (never empty)."""
    if num_masks < 1 or height < 1 or width < 1:
        raise ValueError(f"num_masks, height and width must be positive; got {num_masks}, {height}, {width}")
    generator = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32)[:, None] / max(height - 1, 1)
    xs = torch.arange(width, dtype=torch.float32)[None, :] / max(width - 1, 1)
    masks = torch.zeros(num_masks, height, width)
    for i in range(num_masks):
        num_shapes = int(torch.randint(1, 4, (1,), generator=generator))
        for _ in range(num_shapes):
            cy, cx, ry, rx, kind = torch.rand(5, generator=generator).tolist()
            ry, rx = 0.05 + 0.35 * ry, 0.05 + 0.35 * rx
            if kind < 0.5:
                shape = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
            else:
                shape = ((ys - cy).abs() <= ry) & ((xs - cx).abs() <= rx)
            masks[i] = torch.maximum(masks[i], shape.float())
        if masks[i].sum() == 0:  # a shape entirely off-image: fall back to a centred square
            masks[i, height // 4 : height - height // 4, width // 4 : width - width // 4] = 1.0
    return masks


def synthetic_class_masks(split: str, num_scenes: int, resolution: int) -> torch.Tensor:
    """Every visible class mask ``[M, H, W]`` in {0, 1} of the first `num_scenes` scenes of a synthetic split."""
    masks = []
    for seed in split_seeds(split, num_scenes):
        scene = generate_scene(seed, size=resolution)
        masks += [torch.from_numpy(scene.mask(c)) for c in scene.class_indices]
    return torch.stack(masks).float()


def read_label_maps(data_dir: str | os.PathLike) -> Iterable[tuple[str, np.ndarray]]:
    """Yield ``(path, label_map)`` for every single-channel label image under ``data_dir`` (sorted, recursive)."""
    from PIL import Image

    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(data_dir)
        for name in names
        if name.lower().endswith(LABEL_MAP_SUFFIXES)
    )
    if not paths:
        raise ValueError(f"no label maps ({', '.join(LABEL_MAP_SUFFIXES)}) found under {data_dir!r}")
    for path in paths:
        with Image.open(path) as image:
            label_map = np.array(image)
        if label_map.ndim != 2:
            raise ValueError(f"{path}: label maps must be single-channel (palette or grey); got {label_map.shape}")
        yield path, label_map


def _resize_and_crop(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """Nearest-neighbour resize of the shorter side to ``resolution``, then a centre crop to a square."""
    height, width = mask.shape
    scale = resolution / min(height, width)
    new_size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    mask = F.interpolate(mask[None, None], size=new_size, mode="nearest")[0, 0]
    top, left = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return mask[top : top + resolution, left : left + resolution]


def masks_from_label_maps(
    label_maps: Iterable[np.ndarray],
    num_masks: int,
    resolution: int,
    ignore_labels: Sequence[int] = (255,),
    seed: int = 0,
) -> torch.Tensor:
    """Draw up to ``num_masks`` binary masks ``[N, R, R]``: one random class present in each label map (ignored
    labels never drawn; their pixels count as background), resized and centre-cropped to ``resolution``."""
    rng = np.random.default_rng(seed)
    masks = []
    for label_map in label_maps:
        if len(masks) >= num_masks:
            break
        label_map = np.asarray(label_map)
        values = np.setdiff1d(np.unique(label_map), np.asarray(list(ignore_labels)))
        if values.size == 0:
            continue
        value = rng.choice(values)
        mask = torch.from_numpy((label_map == value).astype(np.float32))
        mask = _resize_and_crop(mask, resolution)
        if mask.sum() > 0:
            masks.append(mask)
    if not masks:
        raise ValueError("no usable mask found (every label map was empty or fully ignored)")
    return torch.stack(masks)


def load_vae(pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
    """Load the `AutoencoderKL` / `AutoencoderTiny` (or any diffusers autoencoder) named by the folder's config."""
    import diffusers

    config = diffusers.AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder=subfolder)
    class_name = config.get("_class_name", "AutoencoderKL")
    vae_class = getattr(diffusers, class_name, None)
    if vae_class is None or not (hasattr(vae_class, "encode") and hasattr(vae_class, "decode")):
        raise ValueError(f"{pretrained_model_name_or_path}: {class_name!r} is not a diffusers autoencoder")
    return vae_class.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs).eval()


@torch.no_grad()
def vae_mask_roundtrip(vae, masks: torch.Tensor, batch_size: int = 8, threshold: float = 0.5) -> dict:
    """Encode and decode ``masks`` (``[N, H, W]`` in {0, 1}) with ``vae`` through `mask_codec` and measure the loss.

    Returns a dict of plain floats (see the module docstring for the definitions).
    """
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise ValueError(f"masks must be a non-empty [N, H, W] tensor; got shape {tuple(masks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    mae, mae_pixels, channel_std, channel_range, mask_ious = [], [], [], [], []
    worst_range, pooled = 0.0, ConfusionMatrix(2)  # mask vs rest, summed over all masks
    for start in range(0, masks.shape[0], batch_size):
        batch = masks[start : start + batch_size].float().to(vae.device)
        channels = decode_mask_channels(vae, encode_masks(vae, batch))  # [B, 3, H, W], float32, unclamped
        if channels.shape[-2:] != batch.shape[-2:]:
            raise ValueError(f"the VAE decodes {tuple(batch.shape[-2:])} masks to {tuple(channels.shape[-2:])}")
        probabilities = mask_channels_to_probabilities(channels)[:, 0]
        mae += (probabilities - batch).abs().mean(dim=(1, 2)).tolist()
        mae_pixels += (channels - (2 * batch[:, None] - 1)).abs().mean(dim=(1, 2, 3)).tolist()
        channel_std += channels.std(dim=1, correction=0).mean(dim=(1, 2)).tolist()
        spread = channels.amax(dim=1) - channels.amin(dim=1)
        channel_range += spread.mean(dim=(1, 2)).tolist()
        worst_range = max(worst_range, float(spread.max()))
        predicted, target = probabilities > threshold, batch > 0.5
        pooled.update(predicted.long(), target.long())
        per_mask = [binary_segmentation_metrics(p, t)["iou"] for p, t in zip(predicted, target)]
        mask_ious += [iou for iou in per_mask if iou == iou]  # undefined (empty and not predicted): left out
    report = {"num_masks": int(masks.shape[0]), "resolution": list(masks.shape[-2:]), "threshold": float(threshold)}
    per_mask = {"mae": mae, "mae_pixel_space": mae_pixels, "channel_std": channel_std, "channel_max_min": channel_range}
    for name, values in per_mask.items():
        report[f"{name}_mean"], report[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    report["channel_max_min_worst"] = worst_range
    report["iou"] = pooled.binary_scores(positive_class=1)["iou"]
    report["mean_mask_iou"] = float(np.mean(mask_ious)) if mask_ious else float("nan")
    return report


def decode_flops(vae, mask_decoder, resolution: int) -> tuple[int, int]:
    """FLOPs of decoding one ``resolution``-px mask latent with the VAE decoder and with the light decoder, counted
    on meta-device copies (shapes only, so SD sizes cost nothing)."""
    meta_vae, meta_decoder = copy.deepcopy(vae).to("meta"), copy.deepcopy(mask_decoder).to("meta")
    side = resolution // mask_decoder.upsampling_factor
    latents = torch.zeros(1, mask_decoder.config.latent_channels, side, side, device="meta")
    full = count_flops(decode_masks, meta_vae, latents)
    return full, count_flops(decode_masks, meta_vae, latents, mask_decoder=meta_decoder)


def format_markdown_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A markdown table with one row per ``(label, report)``."""
    lines = [
        "| VAE / data | masks | resolution | MAE | MAE in [-1, 1] | channel std | channel max-min | IoU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows:
        resolution = "x".join(str(v) for v in r["resolution"])
        lines.append(
            f"| {label} | {r['num_masks']} | {resolution} "
            f"| {r['mae_mean']:.4f} ± {r['mae_std']:.4f} "
            f"| {r['mae_pixel_space_mean']:.4f} ± {r['mae_pixel_space_std']:.4f} "
            f"| {r['channel_std_mean']:.4f} | {r['channel_max_min_mean']:.4f} "
            f"| {r['iou']:.4f} |"
        )
    return "\n".join(lines)
