"""Running a DiGSeg pipeline over labelled examples and accumulating a confusion matrix: the one evaluation
protocol of the training script's validation, `training/evaluate.py` and the demo model's benchmark.

Closed vocabulary: every dataset class is a prompt. Open vocabulary (`evaluate_example` with a class proposer):
only the proposed classes are segmented, so a class not proposed is a miss. Datasets with a valid "no class" value
score background as an extra class K, so a class predicted on background is a false positive.
`EvaluationAccumulator` keeps one setting's counts as plain tensors, so shards can be evaluated by several
processes, checkpointed (`save_partial` / `load_partial`) and summed (``accelerator.reduce``) before `compute`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from digseg_diffusers.atomic_io import atomic_file
from digseg_diffusers.data.readers import BACKGROUND_INDEX
from digseg_diffusers.evaluation.metrics import ConfusionMatrix, IoUThresholdCurve
from digseg_diffusers.image_processing import label_map_from_best

BACKGROUND_NAME = "background"


def new_confusion_matrix(class_names: Sequence[str], ignore_index: int, include_background: bool = True) -> ConfusionMatrix:
    names = list(class_names) + ([BACKGROUND_NAME] if include_background else [])
    return ConfusionMatrix(len(names), ignore_index=ignore_index, class_names=names)


def label_map_at_threshold(probabilities: torch.Tensor | np.ndarray, background_threshold: float) -> torch.Tensor:
    """The pipeline's labelling rule on ``[K, H, W]`` probabilities: 1 + the best prompt where it reaches
    `background_threshold`, else `BACKGROUND_LABEL` (ties keep the earlier prompt)."""
    probabilities = probabilities if torch.is_tensor(probabilities) else torch.from_numpy(np.asarray(probabilities))
    return label_map_from_best(*probabilities.max(dim=0), background_threshold)


@torch.no_grad()
def evaluate_examples(
    pipe,
    examples: Iterable,
    class_names: Sequence[str],
    ignore_index: int = 255,
    include_background: bool = True,
    confusion: ConfusionMatrix | None = None,
    seed: int = 0,
    **pipeline_kwargs,
) -> ConfusionMatrix:
    """Segment each example (``.image`` uint8 HWC, ``.label`` class indices) with every class as a prompt.

    `pipeline_kwargs` go to the pipeline call (`num_inference_steps`, `ensemble_size`, `processing_resolution`,
    `batch_size`, thresholds). Each example uses a generator seeded with `seed` + its position, so results do not
    depend on which process evaluates which example. Returns the (updated) confusion matrix.
    """
    accumulator = EvaluationAccumulator(class_names, ignore_index, include_background, thresholds=())
    if confusion is not None:
        accumulator.confusion = confusion
    every_class = list(range(accumulator.num_classes))
    for position, example in enumerate(examples):
        out = pipe(
            example.image, accumulator.class_names, generator=torch.Generator().manual_seed(seed + position),
            output_type="pt", output_probabilities=False, output_masks=False, **pipeline_kwargs,
        )
        accumulator.add(example.label, every_class, None, out.label_maps[0])
    return accumulator.confusion


def evaluate_examples_at_thresholds(
    pipe,
    examples: Iterable,
    class_names: Sequence[str],
    thresholds: Sequence[float],
    ignore_index: int = 255,
    seed: int = 0,
    **pipeline_kwargs,
) -> dict[float, ConfusionMatrix]:
    """`evaluate_examples` (background included) at several mask thresholds from one pipeline call per example.

    The probabilities do not depend on the threshold, so each threshold's label map (`label_map_at_threshold`,
    the pipeline's rule) is derived from the same call.
    """
    class_names = list(class_names)
    accumulators = {float(t): EvaluationAccumulator(class_names, ignore_index, True, thresholds=()) for t in thresholds}
    every_class = list(range(len(class_names)))
    for position, example in enumerate(examples):
        generator = torch.Generator().manual_seed(seed + position)
        out = pipe(example.image, class_names, generator=generator, output_type="pt", output_masks=False, **pipeline_kwargs)
        for threshold, accumulator in accumulators.items():
            label_map = label_map_at_threshold(out.probabilities[0], threshold)
            accumulator.add(example.label, every_class, None, label_map)
    return {threshold: accumulator.confusion for threshold, accumulator in accumulators.items()}


# ----------------------------------------------------------------------------------------------------------------
# Settings, per-setting accumulation and the open-vocabulary protocol (used by training/evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_CURVE_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Thresholds of the IoU-vs-threshold curve (paper Fig. 3): 0.05, 0.10, ..., 0.95."""

SUMMARY_METRICS = ("mIoU", "pixel_accuracy", "mean_accuracy", "mean_dice")
"""The scalar metrics of a setting that go into a model card's model-index."""

PER_CLASS_METRICS = ("iou", "accuracy", "precision", "dice", "pixels")
"""A setting's ``per_class`` entries: `ConfusionMatrix.compute`'s ``per_class_<name>`` lists, by class name."""


@dataclass(frozen=True)
class EvaluationSetting:
    """One test-time setting: ``ensemble_size`` noise seeds x ``num_inference_steps`` DDIM steps ("ExS")."""

    ensemble_size: int
    num_inference_steps: int

    @property
    def name(self) -> str:
        return f"{self.ensemble_size}x{self.num_inference_steps}"

    @classmethod
    def parse(cls, text: str) -> EvaluationSetting:
        """``"4x2"`` -> ensemble 4, 2 steps (the paper's Table 6 notation)."""
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise ValueError(
                f"a setting must look like ENSEMBLExSTEPS with positive integers, e.g. '1x1' or '4x2'; got {text!r}"
            )
        return cls(int(match.group(1)), int(match.group(2)))


def scoring_target(label: np.ndarray, num_classes: int, ignore_index: int, include_background: bool) -> np.ndarray:
    """A dataset label map in the indices the confusion matrix scores: background -> K (or ignored without a
    background class)."""
    target = np.asarray(label).astype(np.int64)
    return np.where(target == BACKGROUND_INDEX, num_classes if include_background else ignore_index, target)


class EvaluationAccumulator:
    """Counts of one evaluation setting over any number of images, all in `state_dict` (int64 / float64 tensors,
    summable across processes and shards). ``include_background`` scores background as an extra class K;
    ``thresholds`` are the IoU-vs-threshold curve's (empty: no curve, and `add` needs no probabilities).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        ignore_index: int,
        include_background: bool = True,
        thresholds: Sequence[float] = DEFAULT_CURVE_THRESHOLDS,
    ):
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.include_background = include_background
        self.confusion = new_confusion_matrix(self.class_names, ignore_index, include_background)
        self.curve = IoUThresholdCurve(thresholds, num_classes=self.num_classes) if len(thresholds) else None
        # images, ground-truth classes present, classes proposed, present classes proposed, images without proposal
        self.proposal_counts = torch.zeros(5, dtype=torch.int64)
        self.seconds = torch.zeros(1, dtype=torch.float64)

    @property
    def num_images(self) -> int:
        return int(self.proposal_counts[0])

    def add(
        self,
        label: np.ndarray,
        class_indices: Sequence[int],
        probabilities: np.ndarray | torch.Tensor | None,
        label_map: np.ndarray | torch.Tensor | None,
        seconds: float = 0.0,
    ) -> None:
        """Add one image.

        Args:
            label: the dataset's label map (class indices, `BACKGROUND_INDEX`, ignore).
            class_indices: the class of each segmented prompt (all classes, or the proposed ones).
            probabilities: the pipeline's ``[P, H, W]`` maps for those prompts (None when nothing was segmented, or
                when the accumulator keeps no curve).
            label_map: the pipeline's label map (0 = background, p + 1 = prompt p); None = background everywhere.
            seconds: time spent on this image (summed into ``seconds_per_image``).
        """
        class_indices = [int(k) for k in class_indices]
        probs = self._checked_probabilities(probabilities, len(class_indices)) if self.curve is not None else None
        target = scoring_target(label, self.num_classes, self.ignore_index, self.include_background)
        if label_map is None:
            prompt_labels = np.zeros(target.shape, dtype=np.int64)
        else:
            prompt_labels = np.asarray(label_map.cpu() if torch.is_tensor(label_map) else label_map).astype(np.int64)
        if prompt_labels.shape != target.shape:
            raise ValueError(f"label_map has shape {prompt_labels.shape} but the label has shape {target.shape}")
        # prompt p -> its class index; background -> K (scored) or -1 ("no class": a miss, no false positive)
        lookup = np.asarray([self.num_classes if self.include_background else -1] + class_indices, dtype=np.int64)
        self.confusion.update(lookup[prompt_labels], target)

        raw = np.asarray(label).astype(np.int64)
        present = [int(k) for k in np.unique(raw) if 0 <= k < self.num_classes]
        if self.curve is not None:
            self._add_to_curve(raw, present, class_indices, probs)
        proposed_present = len(set(present) & set(class_indices))
        self.proposal_counts += torch.tensor(
            [1, len(present), len(class_indices), proposed_present, int(not class_indices)], dtype=torch.int64
        )
        self.seconds += float(seconds)

    @staticmethod
    def _checked_probabilities(probabilities, num_segmented: int) -> torch.Tensor | None:
        probs = None
        if probabilities is not None:
            probs = probabilities if torch.is_tensor(probabilities) else torch.from_numpy(np.asarray(probabilities))
            probs = probs.float().cpu()
        if num_segmented and (probs is None or probs.shape[0] != num_segmented):
            found = None if probs is None else tuple(probs.shape)
            raise ValueError(f"probabilities must hold one map per segmented class ({num_segmented}); got {found}")
        return probs

    def _add_to_curve(self, raw: np.ndarray, present: list[int], class_indices: list[int], probs) -> None:
        """Every segmented class, plus present classes that were not segmented (probability 0: a miss at any t)."""
        ignore_mask = torch.from_numpy(raw == self.ignore_index)
        raw_tensor = torch.from_numpy(raw)
        curve_classes = list(dict.fromkeys(class_indices + present))
        for start in range(0, len(curve_classes), 16):
            chunk = curve_classes[start : start + 16]
            maps = torch.stack(
                [probs[class_indices.index(k)] if k in class_indices else torch.zeros(raw.shape) for k in chunk]
            )
            targets = torch.stack([raw_tensor == k for k in chunk])
            self.curve.update(maps, targets, class_ids=chunk, ignore_mask=ignore_mask.expand_as(targets))

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "confusion": self.confusion.counts.cpu().clone(),
            "curve": self.curve.counts.cpu().clone() if self.curve is not None else torch.zeros(0, dtype=torch.int64),
            "proposal_counts": self.proposal_counts.clone(),
            "seconds": self.seconds.clone(),
        }

    def _checked(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        expected = self.state_dict()
        for key, current in expected.items():
            if key not in state or tuple(state[key].shape) != tuple(current.shape):
                found = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"saved evaluation state {key!r} has shape {found}; expected {tuple(current.shape)}")
        return {key: state[key].to(expected[key].dtype) for key in expected}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = self._checked(state)
        self.confusion.counts = state["confusion"].clone()
        if self.curve is not None:
            self.curve.counts = state["curve"].clone()
        self.proposal_counts = state["proposal_counts"].clone()
        self.seconds = state["seconds"].clone()

    def merge_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Add another shard's counts."""
        state = self._checked(state)
        self.load_state_dict({key: counts + state[key] for key, counts in self.state_dict().items()})

    # -------------------------------------------------------------------------- results
    def compute(self) -> dict:
        """The setting's results: summary metrics, per-class metrics, ``foreground_iou`` (with a background
        class), the IoU-vs-threshold curve, proposal statistics, ``binary`` scores for single-class datasets, and
        ``seconds_per_image``."""
        metrics = self.confusion.compute()
        names = metrics["class_names"]
        result = {key: metrics[key] for key in SUMMARY_METRICS + ("num_pixels", "num_valid_classes")}
        result["background_class"] = self.include_background
        result["per_class"] = {
            name: {metric: metrics[f"per_class_{metric}"][k] for metric in PER_CLASS_METRICS}
            for k, name in enumerate(names)
        }
        if self.num_classes == 1:  # binary task (roads, lesions): the one class against the rest
            result["binary"] = self.confusion.binary_scores(positive_class=0)
        if self.include_background:
            result["foreground_iou"] = self.confusion.foreground_iou(background_class=self.num_classes)
        if self.curve is not None:
            curve = self.curve.compute()
            curve["class_names"] = list(self.class_names)
            result["iou_vs_threshold"] = curve
        images, present, proposed, hits, empty = (int(v) for v in self.proposal_counts)
        result["num_images"] = images
        result["proposal"] = {
            "mean_classes_per_image": proposed / images if images else float("nan"),
            "recall": hits / present if present else float("nan"),
            "precision": hits / proposed if proposed else float("nan"),
            "images_without_proposal": empty,
        }
        result["seconds_per_image"] = float(self.seconds) / images if images else float("nan")
        return result


def card_metrics(setting_results: dict) -> dict[str, float]:
    """A flat ``{metric_name: value}`` dict of one setting's results for `hub.card_metadata` (undefined values
    left out)."""
    values = {key: setting_results.get(key) for key in SUMMARY_METRICS}
    for key, value in (setting_results.get("binary") or {}).items():
        values[f"binary_{key}"] = value
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and np.isfinite(v)}


@torch.no_grad()
def evaluate_example(
    pipe,
    example,
    index: int,
    accumulators: dict[EvaluationSetting, EvaluationAccumulator],
    class_names: Sequence[str],
    proposer=None,
    seed: int = 0,
    **pipeline_kwargs,
) -> list[int]:
    """Segment one example under every setting and add it to that setting's accumulator.

    Closed vocabulary (``proposer=None``): every class is a prompt. Open vocabulary: the proposer picks the classes
    (the same proposals for every setting). The generator is seeded with ``seed + index`` (the example's index in
    the dataset), so results do not depend on how examples are sharded across processes. Returns the class indices
    that were segmented.
    """
    class_names = list(class_names)
    proposal_seconds = 0.0
    if proposer is None:
        class_indices = list(range(len(class_names)))
    else:
        start = time.perf_counter()
        proposed = proposer.propose(example.image, class_names)[0]
        proposal_seconds = time.perf_counter() - start
        class_indices = [class_names.index(name) for name in proposed]
    for setting, accumulator in accumulators.items():
        if not class_indices:
            accumulator.add(example.label, [], None, None, seconds=proposal_seconds)
            continue
        start = time.perf_counter()
        out = pipe(
            example.image,
            prompt=[class_names[k] for k in class_indices],
            num_inference_steps=setting.num_inference_steps,
            ensemble_size=setting.ensemble_size,
            generator=torch.Generator().manual_seed(seed + index),
            output_type="pt",
            **pipeline_kwargs,
        )
        seconds = time.perf_counter() - start + proposal_seconds
        accumulator.add(example.label, class_indices, out.probabilities[0], out.label_maps[0], seconds=seconds)
    return class_indices


def save_partial(
    path: str | os.PathLike,
    next_position: int,
    accumulators: dict[EvaluationSetting, EvaluationAccumulator],
    fingerprint: dict,
) -> None:
    """Checkpoint one shard: its counts after its first ``next_position`` examples (atomic write)."""
    state = {
        "next_position": int(next_position),
        "fingerprint": dict(fingerprint),
        "settings": {setting.name: accumulator.state_dict() for setting, accumulator in accumulators.items()},
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_partial(
    path: str | os.PathLike, accumulators: dict[EvaluationSetting, EvaluationAccumulator], fingerprint: dict
) -> int:
    """Restore a shard checkpoint into `accumulators`; returns the position to continue from (0 if no file).

    Raises a ValueError naming the differences when the checkpoint was written by another evaluation."""
    if not os.path.isfile(path):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("fingerprint", {})
    differences = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differences:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in differences)
        raise ValueError(
            f"{path} belongs to another evaluation ({details}); use a new output directory or --overwrite."
        )
    for setting, accumulator in accumulators.items():
        accumulator.load_state_dict(state["settings"][setting.name])
    return int(state["next_position"])
