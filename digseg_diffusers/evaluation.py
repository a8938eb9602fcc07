"""Running a DiGSeg pipeline over labelled examples and accumulating a confusion matrix.

One place for the closed-vocabulary protocol, used by the training script's periodic validation,
`training/evaluate.py` and the demo model's benchmark: every dataset class is a prompt, the pipeline's label map
(0 = background, k + 1 = class k) is compared with the dataset's (class indices, -1 = background,
`ignore_index` = ignored).

Background: datasets whose label maps have a valid "no class" value (the synthetic world, VOC-style data)
are scored with one extra class, "background", at index K, so that a class predicted on background counts as a
false positive. Datasets without a background value (ADE20K-150 maps 0 to ignore) are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .data.readers import BACKGROUND_INDEX
from .metrics import ConfusionMatrix
from .pipeline_digseg import BACKGROUND_LABEL

BACKGROUND_NAME = "background"


def pipeline_labels_to_class_indices(label_map: np.ndarray, background_index: int) -> np.ndarray:
    """Pipeline label map (0 = background, k + 1 = prompt k) -> class indices with `background_index`."""
    label_map = np.asarray(label_map)
    return np.where(label_map == BACKGROUND_LABEL, background_index, label_map - 1).astype(np.int64)


def dataset_labels_for_scoring(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Dataset label map (class indices, -1 = background, ignore) -> scoring indices (background = K)."""
    label = np.asarray(label).astype(np.int64)
    return np.where(label == BACKGROUND_INDEX, num_classes, label)


def new_confusion_matrix(class_names: Sequence[str], ignore_index: int, include_background: bool = True) -> ConfusionMatrix:
    names = list(class_names) + ([BACKGROUND_NAME] if include_background else [])
    return ConfusionMatrix(len(names), ignore_index=ignore_index, class_names=names)


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
    class_names = list(class_names)
    num_classes = len(class_names)
    if confusion is None:
        confusion = new_confusion_matrix(class_names, ignore_index, include_background)
    # Without a background class, pixels left as background count as "no class" (a miss for their class).
    background_index = num_classes if include_background else -1
    for position, example in enumerate(examples):
        generator = torch.Generator().manual_seed(seed + position)
        out = pipe(example.image, class_names, generator=generator, output_type="np", **pipeline_kwargs)
        prediction = pipeline_labels_to_class_indices(out.label_maps[0], background_index)
        target = np.asarray(example.label).astype(np.int64)
        if include_background:
            target = dataset_labels_for_scoring(target, num_classes)
        elif (target == BACKGROUND_INDEX).any():
            target = np.where(target == BACKGROUND_INDEX, ignore_index, target)
        confusion.update(prediction, target)
    return confusion
