"""The DiGSeg training sample: one image, one queried class, its binary target (``method.md`` section 3).

The class is drawn among those visible in the augmented crop, or, with probability ``negative_prob``, among those
absent from the whole image (an empty target: absent classes must give empty masks). With ``prompts_per_image =
K > 1`` a sample holds K queries of one image (the multi-prompt loss of `digseg_diffusers.training.step`): the
visible classes (a random K of them if more), then absent ones. Every random choice of sample ``i`` comes from
``np.random.default_rng([seed, epoch, i])``, so it does not depend on which process or worker loads it; call
``set_epoch`` each epoch (workers with ``persistent_workers=True`` keep the epoch they started with).
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

    ``resolution`` is the crop side ``S``; ``scale_range``, ``flip_prob`` and ``resize_short_side`` are those of
    `random_scale_flip_crop`; ``negative_prob`` is the chance of querying a class absent from the image.
    ``prompts_per_image`` K > 1 (at most the number of classes) makes ``mask`` ``[K, 1, S, S]`` and ``class_name``,
    ``class_index``, ``is_negative`` K entries long.
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
        prompts_per_image: int = 1,
    ):
        if not isinstance(reader, SegmentationReader):
            raise ValueError(f"`reader` must be a SegmentationReader, got {type(reader).__name__}.")
        if len(reader) == 0:
            raise ValueError(f"`reader` {reader!r} lists no examples.")
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}.")
        for name, probability in (("negative_prob", negative_prob), ("flip_prob", flip_prob)):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {probability}.")
        if len(scale_range) != 2 or not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"`scale_range` must be (low, high) with 0 < low <= high, got {scale_range}.")
        if seed < 0:
            raise ValueError(f"`seed` must be non-negative, got {seed}.")
        if not isinstance(prompts_per_image, int) or not 1 <= prompts_per_image <= reader.num_classes:
            raise ValueError(
                f"`prompts_per_image` must be an integer in [1, {reader.num_classes}] (the dataset's classes), "
                f"got {prompts_per_image!r}."
            )
        self.reader = reader
        self.resolution = resolution
        self.negative_prob = float(negative_prob)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)
        self.resize_short_side = resize_short_side
        self.seed = int(seed)
        self.prompts_per_image = prompts_per_image
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
        valid = label != ignore_index
        pixel_values = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        common = {
            "pixel_values": pixel_values,
            "valid": torch.from_numpy(valid).float()[None],
            "path": self.reader[used_index].image_path,
            "index": used_index,
            "num_skipped": len(skipped),
            "skipped_paths": [self.reader[i].image_path for i in skipped],
            "fixed_crop": fixed_crop,
        }
        if self.prompts_per_image > 1:
            return {**common, **self._multi_prompt_queries(rng, label, full_label, valid)}
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

        target = (label == class_index) if not is_negative else np.zeros_like(valid)
        return {
            **common,
            "mask": torch.from_numpy(target).float()[None],
            "class_name": self.reader.class_names[class_index],
            "class_index": class_index,
            "is_negative": bool(is_negative),
        }

    def _multi_prompt_queries(self, rng: np.random.Generator, label: np.ndarray, full_label: np.ndarray, valid: np.ndarray) -> dict:
        """K queries of one crop: its visible classes first, then absent ones (see the class docstring)."""
        num_classes, count = self.reader.num_classes, self.prompts_per_image
        present = _classes_present(label, num_classes)
        if present.size > count:
            present = np.sort(rng.choice(present, size=count, replace=False))
        absent = np.setdiff1d(np.arange(num_classes), _classes_present(full_label, num_classes))
        # Classes shown only outside the crop are neither visible nor absent from the image: used last, if needed.
        elsewhere = np.setdiff1d(np.setdiff1d(np.arange(num_classes), present), absent)
        needed = count - present.size
        fill = rng.permutation(absent)[:needed]
        if fill.size < needed:
            fill = np.concatenate([fill, rng.permutation(elsewhere)[: needed - fill.size]])
        classes = np.concatenate([present, fill]).astype(np.int64)
        masks = np.stack([(label == c) & valid for c in classes])
        return {
            "mask": torch.from_numpy(masks).float()[:, None],
            "class_name": [self.reader.class_names[c] for c in classes],
            "class_index": torch.from_numpy(classes),
            "is_negative": torch.from_numpy(~masks.any(axis=(1, 2))),
        }

    def load_validation_example(self, index: int) -> ValidationExample:
        """Full image and label map without augmentation (see ``SegmentationReader.load_validation_example``)."""
        return self.reader.load_validation_example(index)


def _classes_present(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Sorted class indices that occur in ``label`` (background and ignore excluded)."""
    in_class = label[(label >= 0) & (label < num_classes)]
    return np.flatnonzero(np.bincount(in_class.ravel(), minlength=num_classes))


def collate_segmentation_batch(samples: Sequence[dict]) -> dict:
    """Stack a list of training samples into a batch (tensors stacked, strings kept as lists).

    Multi-query samples (``prompts_per_image > 1``) become K consecutive rows each; every row repeats its image's
    pixels, and ``image_row`` says which sample of the batch a row comes from (``arange`` for single queries).
    """
    if not samples:
        raise ValueError("`samples` must not be empty.")
    if samples[0]["mask"].dim() == 3:  # one query per sample: a sample of K = 1 queries
        samples = [
            {
                **s,
                "mask": s["mask"][None],
                "class_name": [s["class_name"]],
                "class_index": torch.tensor([s["class_index"]]),
                "is_negative": torch.tensor([s["is_negative"]]),
            }
            for s in samples
        ]
    counts = [s["mask"].shape[0] for s in samples]
    def repeat(key: str) -> torch.Tensor:
        return torch.cat([s[key].unsqueeze(0).expand(count, *s[key].shape) for s, count in zip(samples, counts)])
    def per_row(key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([s[key] for s, count in zip(samples, counts) for _ in range(count)], dtype=dtype)
    return {
        "pixel_values": repeat("pixel_values"),
        "mask": torch.cat([s["mask"] for s in samples]),
        "valid": repeat("valid"),
        "class_name": [name for s in samples for name in s["class_name"]],
        "class_index": torch.cat([s["class_index"] for s in samples]).long(),
        "is_negative": torch.cat([s["is_negative"] for s in samples]).bool(),
        "path": [s["path"] for s, count in zip(samples, counts) for _ in range(count)],
        "index": per_row("index", torch.long),
        # Skips are counted once per image (the first of its rows), so summing them stays right.
        "num_skipped": torch.tensor([s["num_skipped"] if row == 0 else 0 for s, count in zip(samples, counts) for row in range(count)], dtype=torch.long),
        "skipped_paths": [s["skipped_paths"] if row == 0 else [] for s, count in zip(samples, counts) for row in range(count)],
        "fixed_crop": per_row("fixed_crop", torch.bool),
        "image_row": torch.arange(len(samples)).repeat_interleave(torch.tensor(counts)),
    }
