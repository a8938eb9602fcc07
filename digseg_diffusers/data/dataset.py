"""The DiGSeg training sample: one image, one queried class, its binary target (``method.md`` section 3).

Each sample answers one text query. The class is drawn among those visible in the augmented crop; with
probability ``negative_prob`` it is instead drawn among the classes absent from the whole image and the target
is empty, so that queries for absent classes learn to give empty masks.

Reproducibility: every random choice of sample ``i`` comes from ``np.random.default_rng([seed, epoch, i])``,
so a sample does not depend on which process or worker loads it, nor on what was loaded before. Call
``set_epoch`` at the start of each epoch for fresh augmentation (with ``persistent_workers=True`` the workers
keep the epoch they were started with).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .readers import SegmentationReader, ValidationExample
from .transforms import crop_is_fixed, random_scale_flip_crop

logger = logging.getLogger(__name__)


class SegmentationTrainingDataset(torch.utils.data.Dataset):
    """Wraps any :class:`SegmentationReader` into augmented single-class training samples.

    Each item is a dict:

    - ``pixel_values``: float ``[3, S, S]`` in ``[-1, 1]`` (padding is black, -1);
    - ``mask``: float ``[1, S, S]`` in ``{0, 1}``, the pixels of ``class_name`` (all zero for a negative);
    - ``valid``: float ``[1, S, S]``, 0 on ignored and padded pixels (exclude them from the loss);
    - ``class_name`` (str), ``class_index`` (int), ``is_negative`` (bool), ``path`` (the image file, str);
    - ``index`` (int): the example actually used (differs from the requested one when a file was skipped);
    - ``num_skipped`` (int): unreadable examples passed over to produce this sample (a count of events: the
      same bad file is passed over again whenever it is drawn);
    - ``skipped_paths`` (list of str): the image files of those examples (a set of them counts files);
    - ``fixed_crop`` (bool): the augmentation drew nothing for this image (no scale jitter, no flip, already
      square at ``resolution``), so its pixels are the same in every epoch and their latents may be cached.

    A corrupt or unreadable example is skipped with a warning, remembered (``num_skipped``, ``skipped_paths``)
    and replaced by the next readable one; only a dataset with no readable example raises.

    Args:
        reader: any reader from :mod:`digseg_diffusers.data.readers`.
        resolution: side ``S`` of the square training crops.
        negative_prob: probability of querying a class absent from the image (target all zeros).
        scale_range: random scale factor range.
        flip_prob: probability of a horizontal flip.
        resize_short_side: scale relative to an image whose short side is ``resolution`` (default) rather
            than to the native size.
        seed: base seed of the per-sample generators.
    """

    def __init__(
        self,
        reader: SegmentationReader,
        resolution: int = 512,
        negative_prob: float = 0.1,
        scale_range: tuple[float, float] = (0.8, 1.2),
        flip_prob: float = 0.5,
        resize_short_side: bool = True,
        seed: int = 0,
    ):
        if not isinstance(reader, SegmentationReader):
            raise ValueError(f"`reader` must be a SegmentationReader, got {type(reader).__name__}.")
        if len(reader) == 0:
            raise ValueError(f"`reader` {reader!r} lists no examples.")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}.")
        if not 0.0 <= negative_prob <= 1.0:
            raise ValueError(f"`negative_prob` must be in [0, 1], got {negative_prob}.")
        if len(scale_range) != 2 or not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"`scale_range` must be (low, high) with 0 < low <= high, got {scale_range}.")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"`flip_prob` must be in [0, 1], got {flip_prob}.")
        if seed < 0:
            raise ValueError(f"`seed` must be non-negative, got {seed}.")
        self.reader = reader
        self.resolution = resolution
        self.negative_prob = float(negative_prob)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)
        self.resize_short_side = resize_short_side
        self.seed = int(seed)
        self.epoch = 0
        self._bad: dict[int, str] = {}  # index -> error message

    @property
    def class_names(self) -> list[str]:
        return self.reader.class_names

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable examples met so far in this process."""
        return len(self._bad)

    @property
    def skipped_paths(self) -> list[str]:
        return [self.reader[index].image_path for index in sorted(self._bad)]

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation of every sample (same epoch -> same samples)."""
        self.epoch = int(epoch)

    def sample_generator(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a dataset of {size} examples.")
        index %= size
        skipped: list[int] = []
        for offset in range(size):
            candidate = (index + offset) % size
            if candidate in self._bad:
                skipped.append(candidate)
                continue
            try:
                image, label = self.reader.load_pair(candidate)
            except Exception as error:  # any unreadable file must not end a long run
                self._mark_bad(candidate, error)
                skipped.append(candidate)
                continue
            return self._make_sample(index, candidate, image, label, skipped)
        first_errors = "; ".join(list(self._bad.values())[:3])
        raise RuntimeError(
            f"none of the {size} examples of {self.reader!r} could be read. First errors: {first_errors}"
        )

    def _mark_bad(self, index: int, error: Exception) -> None:
        message = f"{self.reader[index].image_path}: {type(error).__name__}: {error}"
        self._bad[index] = message
        logger.warning(f"Skipping unreadable example {index} ({len(self._bad)} skipped so far): {message}")

    def _make_sample(self, index: int, used_index: int, image: np.ndarray, label: np.ndarray, skipped: list[int]) -> dict:
        rng = self.sample_generator(index)
        ignore_index = self.reader.ignore_index
        num_classes = self.reader.num_classes
        full_label = label
        fixed_crop = crop_is_fixed(
            *label.shape, self.resolution, self.scale_range, self.flip_prob, resize_short_side=self.resize_short_side
        )
        image, label = random_scale_flip_crop(
            image,
            label,
            rng,
            resolution=self.resolution,
            ignore_index=ignore_index,
            scale_range=self.scale_range,
            flip_prob=self.flip_prob,
            resize_short_side=self.resize_short_side,
        )
        wants_negative = rng.random() < self.negative_prob
        present = _classes_present(label, num_classes)
        is_negative = wants_negative or present.size == 0
        if is_negative:
            # Absent from the whole image, not just the crop; failing that (every class shown), from the crop.
            candidates = np.setdiff1d(np.arange(num_classes), _classes_present(full_label, num_classes))
            if candidates.size == 0:
                candidates = np.setdiff1d(np.arange(num_classes), present)
            if candidates.size == 0:  # the crop shows every class: no negative possible
                is_negative, candidates = False, present
        else:
            candidates = present
        class_index = int(rng.choice(candidates))

        valid = label != ignore_index
        target = (label == class_index) if not is_negative else np.zeros_like(valid)
        pixel_values = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        return {
            "pixel_values": pixel_values,
            "mask": torch.from_numpy(target).float()[None],
            "valid": torch.from_numpy(valid).float()[None],
            "class_name": self.reader.class_names[class_index],
            "class_index": class_index,
            "is_negative": bool(is_negative),
            "path": self.reader[used_index].image_path,
            "index": used_index,
            "num_skipped": len(skipped),
            "skipped_paths": [self.reader[i].image_path for i in skipped],
            "fixed_crop": fixed_crop,
        }

    def load_validation_example(self, index: int) -> ValidationExample:
        """Full image and label map without augmentation (see ``SegmentationReader.load_validation_example``)."""
        return self.reader.load_validation_example(index)


def _classes_present(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Sorted class indices that occur in ``label`` (background and ignore excluded)."""
    in_class = label[(label >= 0) & (label < num_classes)]
    return np.flatnonzero(np.bincount(in_class.ravel(), minlength=num_classes))


def collate_segmentation_batch(samples: Sequence[dict]) -> dict:
    """Stack a list of training samples into a batch (tensors stacked, strings kept as lists)."""
    if not samples:
        raise ValueError("`samples` must not be empty.")
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "valid": torch.stack([s["valid"] for s in samples]),
        "class_name": [s["class_name"] for s in samples],
        "class_index": torch.tensor([s["class_index"] for s in samples], dtype=torch.long),
        "is_negative": torch.tensor([s["is_negative"] for s in samples], dtype=torch.bool),
        "path": [s["path"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "num_skipped": torch.tensor([s["num_skipped"] for s in samples], dtype=torch.long),
        "skipped_paths": [s["skipped_paths"] for s in samples],
        "fixed_crop": torch.tensor([s["fixed_crop"] for s in samples], dtype=torch.bool),
    }
