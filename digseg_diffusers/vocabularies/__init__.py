"""Benchmark vocabularies: class names and the label ids each dataset stores in its annotation files.

Each is a JSON file next to this module (``README.md`` says where every list comes from). A `Vocabulary` maps a
raw label map to class indices ``0..K-1`` and everything else (unlabeled, background of the 59/20-class protocols,
unknown ids) to an ignore index; `Vocabulary.with_contiguous_ids` reads already converted annotations.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources

import numpy as np
import torch

__all__ = [
    "Vocabulary", "list_vocabularies", "load_vocabulary", "ignore_index_for", "IGNORE_INDEX", "LARGE_IGNORE_INDEX"
]

IGNORE_INDEX = 255
"""Class index given to ignored pixels by `Vocabulary.map_labels` when the vocabulary has fewer than 255 classes."""

LARGE_IGNORE_INDEX = 65535
"""Ignore index for vocabularies of 255 classes or more (A-847, PC-459), where 255 is a real class."""

# canonical name -> its aliases (matched after `_normalize`)
_VOCABULARY_ALIASES: dict[str, tuple[str, ...]] = {
    "ade20k-150": ("a-150", "a150", "ade150", "ade-150", "ade20k"),
    "ade20k-847": ("a-847", "a847", "ade847", "ade-847", "ade20k-full"),
    "pascal-context-59": ("pc-59", "pc59", "pascal-context", "context-59"),
    "pascal-context-459": ("pc-459", "pc459", "context-459"),
    "coco-stuff-171": ("coco-stuff", "cocostuff", "coco-stuff-164k", "coco-171"),
    "cityscapes-19": ("cityscapes", "cs-19"),
    "pascal-voc-20": ("voc", "voc20", "voc-20", "pascal-voc", "pascal-voc-2012"),
}
_VOCABULARY_NAMES = tuple(_VOCABULARY_ALIASES)
_ALIASES = {alias: name for name, aliases in _VOCABULARY_ALIASES.items() for alias in aliases}


def ignore_index_for(num_classes: int) -> int:
    """255 while it cannot collide with a class index, else 65535 (for 16-bit label maps)."""
    return IGNORE_INDEX if num_classes < IGNORE_INDEX else LARGE_IGNORE_INDEX


@dataclass
class Vocabulary:
    """Class names in evaluation order with the raw label id of each in the dataset's annotation files.

    A-847 names keep the full comma-separated WordNet synonym string (what CLIP-based methods prompt with;
    `synonyms` splits it). ``ignore_label`` and ``background_label`` (VOC, PASCAL Context: not a class of the
    vocabulary) are raw values that map to the ignore index. ``alternate_ids`` are the data file's other id columns,
    the same classes in another annotation format (Cityscapes ``label_id``, A-847 ``train_id``, PC-59 ``pc459_id``),
    read with `with_alternate_ids`. ``title``, ``label_format`` and ``sources`` document the data file.
    """

    name: str
    class_names: list[str]
    label_ids: list[int]
    ignore_label: int | None = None
    background_label: int | None = None
    title: str = ""
    label_format: str = ""
    sources: list[str] = field(default_factory=list)
    alternate_ids: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        id_columns = {"label_ids": self.label_ids}
        id_columns.update({f"alternate_ids[{column!r}]": ids for column, ids in self.alternate_ids.items()})
        for column, ids in id_columns.items():
            if len(ids) != len(self.class_names):
                raise ValueError(
                    f"{column} ({len(ids)}) and class_names ({len(self.class_names)}) must have the same length"
                )
        if len(set(self.label_ids)) != len(self.label_ids):
            raise ValueError(f"label_ids of vocabulary {self.name!r} contain duplicates")
        if any(i < 0 for i in self.label_ids):
            raise ValueError(f"label_ids of vocabulary {self.name!r} must be non-negative")
        for what, raw_id in (("ignore_label", self.ignore_label), ("background_label", self.background_label)):
            if raw_id is not None and raw_id in self.label_ids:
                raise ValueError(f"{what} {raw_id} of vocabulary {self.name!r} is also the label id of a class")

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ignore_index(self) -> int:
        """The class index `map_labels` gives to ignored pixels (`ignore_index_for`)."""
        return ignore_index_for(self.num_classes)

    @property
    def synonyms(self) -> list[list[str]]:
        """Each class name split at ", " (A-847 names are WordNet synonym lists; other vocabularies give one each)."""
        return [[part.strip() for part in name.split(", ") if part.strip()] for name in self.class_names]

    def index(self, class_name: str) -> int:
        """The class index of ``class_name``."""
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise ValueError(f"{class_name!r} is not a class of vocabulary {self.name!r}") from None

    @cached_property
    def _lookup_table(self) -> np.ndarray:
        table = np.full(max(self.label_ids) + 1, self.ignore_index, dtype=np.int64)
        table[np.asarray(self.label_ids, dtype=np.int64)] = np.arange(self.num_classes, dtype=np.int64)
        return table

    def map_labels(self, label_map: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map a raw dataset label map (any shape, integer values) to class indices ``0..K-1``.

        Every value that is not one of `label_ids` (the ignore label, background, unknown ids, negative values)
        becomes `ignore_index`. Returns int64 of the same kind (numpy or torch, same device) as the input.
        """
        if isinstance(label_map, torch.Tensor):
            if label_map.is_floating_point() or label_map.is_complex():
                raise ValueError(f"label_map must hold integers; got dtype {label_map.dtype}")
            labels, table = label_map.long(), torch.from_numpy(self._lookup_table).to(label_map.device)
            result = torch.full_like(labels, self.ignore_index)
        else:
            labels = np.asarray(label_map)
            if not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"label_map must hold integers; got dtype {labels.dtype}")
            labels, table = labels.astype(np.int64, copy=False), self._lookup_table
            result = np.full(labels.shape, self.ignore_index, dtype=np.int64)
        valid = (labels >= 0) & (labels < len(table))
        result[valid] = table[labels[valid]]
        return result

    def with_contiguous_ids(self, ignore_label: int | None = None) -> Vocabulary:
        """The same classes for annotations already stored as class indices ``0..K-1``.

        That is the format of detectron2's prepared benchmarks (``annotations_detectron2``: 255 ignore, 65535 for
        A-847/PC-459 TIFFs) and of mmseg's ``*_labelTrainIds.png``. ``ignore_label`` defaults to `ignore_index`.
        """
        return dataclasses.replace(
            self,
            label_ids=list(range(self.num_classes)),
            ignore_label=self.ignore_index if ignore_label is None else ignore_label,
            background_label=None,
            label_format=f"contiguous class indices 0..{self.num_classes - 1}",
        )

    def with_alternate_ids(self, column: str) -> Vocabulary:
        """The same classes for annotations stored with another id column of the data file (`alternate_ids`),
        e.g. ``load_vocabulary("cityscapes-19").with_alternate_ids("label_id")`` for raw ``*_gtFine_labelIds.png``."""
        if column not in self.alternate_ids:
            known = ", ".join(sorted(self.alternate_ids)) or "none"
            raise ValueError(f"vocabulary {self.name!r} has no id column {column!r}; its other id columns: {known}")
        label_format = f"{column!r} ids of: {self.label_format}"
        return dataclasses.replace(self, label_ids=list(self.alternate_ids[column]), label_format=label_format)

    def subset(self, class_names: list[str]) -> Vocabulary:
        """A vocabulary with only ``class_names`` (in that order), keeping their label ids."""
        indices = [self.index(n) for n in class_names]
        return dataclasses.replace(
            self,
            name=f"{self.name}-subset",
            class_names=[self.class_names[i] for i in indices],
            label_ids=[self.label_ids[i] for i in indices],
            alternate_ids={column: [ids[i] for i in indices] for column, ids in self.alternate_ids.items()},
        )


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def list_vocabularies() -> list[str]:
    """Canonical names of the bundled vocabularies."""
    return list(_VOCABULARY_NAMES)


def load_vocabulary(name: str) -> Vocabulary:
    """Load a bundled vocabulary by canonical name or alias (e.g. ``"a-150"``, ``"pc-459"``, ``"voc"``)."""
    if not isinstance(name, str):
        raise ValueError(f"vocabulary name must be a string; got {type(name).__name__}")
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    if key not in _VOCABULARY_NAMES:
        raise ValueError(
            f"Unknown vocabulary {name!r}. Known vocabularies: {', '.join(_VOCABULARY_NAMES)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})"
        )
    text = resources.files(__name__).joinpath(f"{key}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    classes = data["classes"]
    columns = sorted(set(classes[0]) - {"id", "name"})
    return Vocabulary(
        name=data["name"],
        class_names=[c["name"] for c in classes],
        label_ids=[int(c["id"]) for c in classes],
        ignore_label=data.get("ignore_label"),
        background_label=data.get("background_label"),
        title=data.get("title", ""),
        label_format=data.get("label_format", ""),
        sources=list(data.get("sources", [])),
        alternate_ids={column: [int(c[column]) for c in classes] for column in columns},
    )
