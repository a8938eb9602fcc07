"""Dataset readers (one split of a dataset, its label ids mapped to class indices; :func:`build_reader` picks one by
name) and :class:`SegmentationTrainingDataset`, which turns any reader into augmented one-class training samples.
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
