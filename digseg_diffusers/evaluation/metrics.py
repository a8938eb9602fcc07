"""Segmentation metrics from an accumulated confusion matrix, and the IoU-against-threshold curve.

Conventions of mmsegmentation's ``IoUMetric`` and detectron2's ``SemSegEvaluator``, so numbers compare with
published ones: ignored pixels are skipped; one confusion matrix over the whole dataset (no per-image averages);
IoU ``TP / (TP + FP + FN)``, NaN (left out of mIoU) for a class in neither ground truth nor prediction, 0 (counted)
for a class predicted but absent; accuracy (recall) NaN without ground-truth pixels; pixel accuracy
``sum(TP) / non-ignored pixels``; Dice = F1 = ``2 TP / (2 TP + FP + FN)``. Predictions outside ``0..K-1`` ("no
class") are misses of the true class without a false positive anywhere (an extra column).

Not torchmetrics: its averages fill absent classes with ``zero_division`` instead of leaving them out, its
``ignore_index`` handling changed between releases (Lightning-AI/torchmetrics#1691, #1692) and it syncs through
``torch.distributed``; one count tensor summed with ``accelerator.reduce(..., "sum")`` is exact and simpler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def _as_long_tensor(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        tensor = x
    else:
        array = np.asarray(x)
        if array.dtype == np.bool_:
            array = array.astype(np.int64)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices; got dtype {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.int64, copy=False))
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name} must hold integer class indices; got dtype {tensor.dtype}")
    tensor = tensor.long()
    return tensor if device is None else tensor.to(device)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """Elementwise division that gives NaN (not inf) where the denominator is 0."""
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(denominator > 0, numerator / denominator, float("nan"))


def _argmax_or_none(values: torch.Tensor) -> int | None:
    """The index of the largest value, ignoring NaN; None when every value is NaN."""
    return None if bool(torch.isnan(values).all()) else int(torch.nan_to_num(values, nan=-1.0).argmax())


class ConfusionMatrix:
    """Accumulates a ``[K, K + 1]`` count matrix: rows are ground-truth classes, columns predicted classes, and
    the last column counts pixels predicted as "no class" (any value outside ``0..K-1``).

    Several processes: each updates its own matrix, then
    ``cm.counts = accelerator.reduce(cm.counts.to(accelerator.device), "sum").cpu()`` (or `merge`) before `compute`.
    ``ignore_index`` is the ground-truth value to skip (65535 for the A-847 / PC-459 vocabularies).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {num_classes}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class index (num_classes={num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.counts = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    @property
    def matrix(self) -> torch.Tensor:
        """The ``[K, K]`` confusion matrix (ground truth x prediction) without the "no class" column."""
        return self.counts[:, : self.num_classes]

    @property
    def unassigned(self) -> torch.Tensor:
        """Per ground-truth class, the pixels predicted as "no class"."""
        return self.counts[:, self.num_classes]

    def to(self, device: torch.device | str) -> ConfusionMatrix:
        self.counts = self.counts.to(device)
        return self

    def update(self, pred, target) -> None:
        """Add a prediction / ground-truth pair of equal shape (any shape; numpy or torch integer class indices).

        ``target`` values must be class indices or ``ignore_index``; ``pred`` values outside ``0..K-1`` count as
        "no class".
        """
        device = pred.device if isinstance(pred, torch.Tensor) else None
        pred = _as_long_tensor(pred, "pred", device)
        target = _as_long_tensor(target, "target", pred.device)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        k = self.num_classes
        pred, target = pred.reshape(-1), target.reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= k:
            bad = low if low < 0 else high
            raise ValueError(
                f"target contains {bad}, which is neither a class index in [0, {k - 1}] nor ignore_index "
                f"({self.ignore_index}); map raw dataset labels first (Vocabulary.map_labels)"
            )
        pred = torch.where((pred >= 0) & (pred < k), pred, torch.full_like(pred, k))
        flat = torch.bincount(target * (k + 1) + pred, minlength=k * (k + 1))
        self.counts += flat.reshape(k, k + 1).to(self.counts.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another process or shard)."""
        if other.counts.shape != self.counts.shape:
            raise ValueError(
                f"cannot merge confusion matrices of shapes {tuple(other.counts.shape)} and {tuple(self.counts.shape)}"
            )
        self.counts += other.counts.to(self.counts.device)
        return self

    def per_class_statistics(self) -> dict[str, torch.Tensor]:
        """True positives, false positives, false negatives and ground-truth pixels per class (float64)."""
        counts = self.counts.double().cpu()
        matrix = counts[:, : self.num_classes]
        true_positive = matrix.diagonal()
        ground_truth = counts.sum(dim=1)  # includes pixels predicted as "no class"
        predicted = matrix.sum(dim=0)
        return {
            "true_positive": true_positive,
            "false_positive": predicted - true_positive,
            "false_negative": ground_truth - true_positive,
            "ground_truth": ground_truth,
            "predicted": predicted,
        }

    def compute(self) -> dict:
        """All metrics as plain Python numbers (NaN where undefined; see the module docstring).

        Keys: ``mIoU``, ``pixel_accuracy``, ``mean_accuracy``, ``mean_dice``, ``num_pixels``, ``num_valid_classes``,
        and per-class lists ``per_class_iou``, ``per_class_accuracy`` (recall), ``per_class_precision``,
        ``per_class_dice`` (= F1), ``per_class_pixels``; ``class_names`` when known.
        """
        stats = self.per_class_statistics()
        tp, fp, fn, gt = stats["true_positive"], stats["false_positive"], stats["false_negative"], stats["ground_truth"]
        iou = _divide(tp, tp + fp + fn)
        accuracy = _divide(tp, gt)
        precision = _divide(tp, tp + fp)
        dice = _divide(2 * tp, 2 * tp + fp + fn)
        total = gt.sum()
        result = {
            "mIoU": float(iou.nanmean()),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_accuracy": float(accuracy.nanmean()),
            "mean_dice": float(dice.nanmean()),
            "num_pixels": int(total),
            "num_valid_classes": int((~torch.isnan(iou)).sum()),
            "per_class_iou": iou.tolist(),
            "per_class_accuracy": accuracy.tolist(),
            "per_class_precision": precision.tolist(),
            "per_class_dice": dice.tolist(),
            "per_class_pixels": [int(v) for v in gt.tolist()],
        }
        if self.class_names is not None:
            result["class_names"] = list(self.class_names)
        return result

    def foreground_iou(self, background_class: int) -> float:
        """Pooled class-agnostic IoU of "any class but `background_class`": where objects are found, whichever
        class they are given (pixels left without a class count as background). NaN when nothing is foreground."""
        if not 0 <= background_class < self.num_classes:
            raise ValueError(f"background_class must be in [0, {self.num_classes - 1}]; got {background_class}")
        counts = self.counts.double()
        foreground = [k for k in range(self.num_classes) if k != background_class]
        hits = counts[foreground][:, foreground].sum()
        false_alarms = counts[background_class, foreground].sum()
        misses = counts[foreground, background_class].sum() + counts[foreground, self.num_classes].sum()
        union = hits + false_alarms + misses
        return float(hits / union) if union > 0 else float("nan")

    def binary_scores(self, positive_class: int = 1) -> dict[str, float]:
        """IoU, precision, recall, F1, Dice and pixel accuracy of one class against the rest (roads, lesions, ...)."""
        if not 0 <= positive_class < self.num_classes:
            raise ValueError(f"positive_class must be in [0, {self.num_classes - 1}]; got {positive_class}")
        stats = self.per_class_statistics()
        tp, fp, fn = (stats[k][positive_class] for k in ("true_positive", "false_positive", "false_negative"))
        total = stats["ground_truth"].sum()
        tn = total - tp - fp - fn
        scalar = lambda n, d: float(n / d) if d > 0 else float("nan")  # noqa: E731
        f1 = scalar(2 * tp, 2 * tp + fp + fn)  # = Dice
        return {
            "iou": scalar(tp, tp + fp + fn),
            "precision": scalar(tp, tp + fp),
            "recall": scalar(tp, tp + fn),
            "f1": f1,
            "dice": f1,
            "accuracy": scalar(tp + tn, total),
        }


def binary_segmentation_metrics(pred_mask, target_mask, ignore_mask=None) -> dict[str, float]:
    """IoU / precision / recall / F1 / Dice / accuracy of boolean masks (any shape) of the positive class.

    ``ignore_mask`` (same shape, True = skip) excludes pixels, like the ignore label does.
    """
    pred = _as_long_tensor(pred_mask, "pred_mask").bool().long()
    target = _as_long_tensor(target_mask, "target_mask", pred.device).bool().long()
    if ignore_mask is not None:
        ignore = _as_long_tensor(ignore_mask, "ignore_mask", pred.device).bool()
        if ignore.shape != target.shape:
            raise ValueError(
                f"ignore_mask must have the shape of target_mask; got {tuple(ignore.shape)} and {tuple(target.shape)}"
            )
        target = torch.where(ignore, torch.full_like(target, 255), target)
    matrix = ConfusionMatrix(2, ignore_index=255)
    matrix.update(pred, target)
    return matrix.binary_scores(positive_class=1)


class IoUThresholdCurve:
    """Accumulates, per class, the IoU of ``probability > t`` masks against binary targets for many thresholds t
    (paper Fig. 3). Intersections and unions are summed over all updates (dataset-level IoU per class).

    Uses one ``bucketize`` + ``bincount`` per update instead of thresholding T times. `counts` (``[C, T, 2]``:
    intersection, union) is a plain tensor for ``accelerator.reduce(..., "sum")``.
    """

    def __init__(self, thresholds: Sequence[float], num_classes: int = 1, device: torch.device | str | None = None):
        thresholds = torch.as_tensor(list(thresholds), dtype=torch.float64)
        if thresholds.ndim != 1 or thresholds.numel() == 0:
            raise ValueError("thresholds must be a non-empty 1-D sequence")
        if bool((thresholds[1:] <= thresholds[:-1]).any()):
            raise ValueError("thresholds must be strictly increasing")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
        self.thresholds = thresholds
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, thresholds.numel(), 2, dtype=torch.int64, device=device)

    def update(self, probabilities, target_masks, class_ids: Sequence[int] | None = None, ignore_mask=None) -> None:
        """Add masks. ``probabilities``: ``[N, H, W]`` (or ``[H, W]``) in [0, 1]; ``target_masks``: same shape, bool;
        ``class_ids``: the class of each of the N masks (all class 0 when omitted); ``ignore_mask``: same shape, True
        where pixels are not evaluated."""
        probs, targets = _as_tensor(probabilities), _as_tensor(target_masks)
        ignore = None if ignore_mask is None else _as_tensor(ignore_mask).bool()
        if probs.ndim == 2:
            probs, targets = probs[None], targets[None]
            ignore = None if ignore is None else ignore[None]
        if probs.shape != targets.shape or probs.ndim != 3:
            raise ValueError(
                "probabilities and target_masks must both be [N, H, W]; "
                f"got {tuple(probs.shape)} and {tuple(targets.shape)}"
            )
        n = probs.shape[0]
        class_ids = [0] * n if class_ids is None else list(class_ids)
        if len(class_ids) != n:
            raise ValueError(f"class_ids has {len(class_ids)} entries for {n} masks")
        if any(not 0 <= c < self.num_classes for c in class_ids):
            raise ValueError(f"class_ids must be in [0, {self.num_classes - 1}]; got {class_ids}")
        valid = torch.ones_like(targets, dtype=torch.bool) if ignore is None else ~ignore
        if valid.shape != targets.shape:
            raise ValueError(f"ignore_mask must have shape {tuple(targets.shape)}; got {tuple(valid.shape)}")
        thresholds = self.thresholds.to(probs.device)
        targets, valid = targets.to(probs.device), valid.to(probs.device)
        t = thresholds.numel()
        # positive at threshold j  <=>  p > t_j  <=>  j < (number of thresholds strictly below p)
        below = torch.bucketize(probs.double().contiguous(), thresholds, right=False)
        targets = targets.bool()
        for i in range(n):
            keep = valid[i]
            bucket, target = below[i][keep], targets[i][keep]
            positives_on_target = torch.bincount(bucket[target], minlength=t + 1)
            positives_off_target = torch.bincount(bucket[~target], minlength=t + 1)
            # suffix sums: pixels with bucket > j
            inter = positives_on_target.flip(0).cumsum(0).flip(0)[1:]
            false_pos = positives_off_target.flip(0).cumsum(0).flip(0)[1:]
            union = int(target.sum()) + false_pos
            self.counts[class_ids[i], :, 0] += inter.to(self.counts.device)
            self.counts[class_ids[i], :, 1] += union.to(self.counts.device)

    def compute(self) -> dict:
        """``thresholds``; ``per_class_iou`` ``[C][T]`` (NaN where a class never appeared); ``mean_iou`` ``[T]``
        (mean over classes with a defined IoU); ``best_threshold`` / ``best_mean_iou``; ``per_class_best_threshold``."""
        iou = _divide(self.counts[..., 0].cpu(), self.counts[..., 1].cpu())  # [C, T]
        mean = iou.nanmean(dim=0)
        thresholds = self.thresholds.tolist()
        best = _argmax_or_none(mean)
        per_class_best = [None if (j := _argmax_or_none(row)) is None else thresholds[j] for row in iou]
        return {
            "thresholds": thresholds,
            "per_class_iou": iou.tolist(),
            "mean_iou": mean.tolist(),
            "best_threshold": None if best is None else thresholds[best],
            "best_mean_iou": float("nan") if best is None else float(mean[best]),
            "per_class_best_threshold": per_class_best,
        }


def iou_vs_threshold(probabilities, target_masks, thresholds: Sequence[float], ignore_mask=None) -> np.ndarray:
    """IoU of ``probabilities > t`` against ``target_masks`` for each threshold t, pooled over all masks.

    ``probabilities`` / ``target_masks``: ``[N, H, W]`` or ``[H, W]`` (numpy or torch), or lists of such arrays
    with different sizes. Returns a float64 array of shape ``[len(thresholds)]`` (NaN if both are empty everywhere).
    """
    curve = IoUThresholdCurve(thresholds)
    if isinstance(probabilities, (list, tuple)):
        if not isinstance(target_masks, (list, tuple)) or len(target_masks) != len(probabilities):
            raise ValueError("target_masks must be a list of the same length as probabilities")
        ignores = ignore_mask if ignore_mask is not None else [None] * len(probabilities)
        for p, t, ig in zip(probabilities, target_masks, ignores):
            curve.update(p, t, ignore_mask=ig)
    else:
        curve.update(probabilities, target_masks, ignore_mask=ignore_mask)
    return np.asarray(curve.compute()["per_class_iou"][0], dtype=np.float64)


def to_jsonable(value):
    """Replace NaN / inf by None recursively (strict JSON has no NaN) and tensors / numpy values by Python ones."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
