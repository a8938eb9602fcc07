"""Dataset readers and the DiGSeg training sample transform.

- Readers (``readers.py``) list one split of a dataset and map its label ids to class indices:
  :class:`FolderReader` (the generic format of ``docs/data_format.md``), :class:`ADE20KReader`,
  :class:`COCOStuffReader`, :class:`CityscapesReader`, :class:`PascalContextReader`; :func:`build_reader`
  picks one by name. Benchmark readers take their default class names and raw label ids from the bundled
  vocabularies (``digseg_diffusers.vocabularies``).
- :class:`SegmentationTrainingDataset` turns any reader into augmented one-class-per-sample training items;
  :func:`collate_segmentation_batch` batches them.
"""

from .dataset import SegmentationTrainingDataset, collate_segmentation_batch
from .readers import (
    BACKGROUND_INDEX,
    IGNORE_INDEX,
    READERS,
    ADE20KReader,
    CityscapesReader,
    COCOStuffReader,
    FolderReader,
    PascalContextReader,
    SegmentationExample,
    SegmentationReader,
    ValidationExample,
    build_reader,
    ignore_index_for,
    read_class_names_file,
    read_image,
    read_label_ids,
)
from .transforms import augmentation_is_random, crop_is_fixed, random_scale_flip_crop, resize_image, resize_label_nearest

__all__ = [
    "BACKGROUND_INDEX",
    "IGNORE_INDEX",
    "READERS",
    "ADE20KReader",
    "COCOStuffReader",
    "CityscapesReader",
    "FolderReader",
    "PascalContextReader",
    "SegmentationExample",
    "SegmentationReader",
    "SegmentationTrainingDataset",
    "ValidationExample",
    "augmentation_is_random",
    "build_reader",
    "collate_segmentation_batch",
    "crop_is_fixed",
    "ignore_index_for",
    "random_scale_flip_crop",
    "read_class_names_file",
    "read_image",
    "read_label_ids",
    "resize_image",
    "resize_label_nearest",
]
