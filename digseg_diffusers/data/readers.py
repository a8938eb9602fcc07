"""Dataset readers: list the (image, label map) pairs of one split and map raw label ids to class indices.

Every reader maps its dataset's label encoding to one form, so training and evaluation never need to know which
dataset they read: class ``k`` is ``reader.class_names[k]``; ``BACKGROUND_INDEX`` (-1) is a valid pixel of no class
(a negative for every class); ``reader.ignore_index`` (255, or 65535 for 255 classes or more) is left out of the
loss and the metrics. A benchmark reader's class names and raw ids come from its bundled vocabulary
(``vocabulary_name``). Layout problems raise while listing, with the offending path; problems inside a file raise
when it is loaded, which the training dataset turns into a skipped, counted sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from digseg_diffusers.image_processing import open_image, to_uint8_rgb
from digseg_diffusers.vocabularies import IGNORE_INDEX, Vocabulary, ignore_index_for, load_vocabulary

logger = logging.getLogger(__name__)

BACKGROUND_INDEX = -1
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
LABEL_MODES: tuple[str, ...] = ("L", "P", "I;16", "I;16L", "I;16B", "I")
_UNKNOWN = -2  # lookup-table value of label ids the mapping does not know
_LUT_SIZE = 65536


@dataclass(frozen=True)
class SegmentationExample:
    image_path: str
    label_path: str


@dataclass(frozen=True)
class ValidationExample:
    """A full image and label map, no augmentation: what an evaluation loop needs.

    ``label`` holds class indices (``int64``), ``BACKGROUND_INDEX`` for background and ``ignore_index`` for
    ignored pixels.
    """

    image: np.ndarray
    label: np.ndarray
    class_names: list[str]
    image_path: str
    ignore_index: int = IGNORE_INDEX


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB ``uint8`` ``[H, W, 3]`` through the package's one canonicaliser: grayscale, palette, alpha, CMYK and
    16-bit images are converted (16-bit rescaled, not clipped). EXIF rotation is NOT applied, because label maps
    carry none and would no longer line up. Unreadable files raise a `ValueError` naming the file."""
    with open_image(path) as image:
        return to_uint8_rgb(image).copy()


def read_label_ids(path: str | os.PathLike) -> np.ndarray:
    """Raw ids of a single-channel label map (8-bit, palette indices, 16-bit or 32-bit integer PNG)."""
    with Image.open(path) as label:
        label.load()
        if label.mode not in LABEL_MODES:
            raise ValueError(
                f"label map {path} must be single-channel (PIL mode one of {LABEL_MODES}), got mode {label.mode!r}."
            )
        return np.asarray(label).copy()


class SegmentationReader(Sequence):
    """Pairs of files of one split, their class names, and the raw-id -> class-index mapping (``label_mapping``,
    to a class index or ``BACKGROUND_INDEX``). Subclasses only find the files and the mapping; loading lives here.
    ``strict``: raw ids outside the mapping and ``ignore_ids`` raise (a broken file) instead of being ignored (a
    dataset whose unlisted ids mean "unlabelled").
    """

    name = "segmentation"
    vocabulary_name: str | None = None
    """The bundled vocabulary that gives a benchmark reader's default class names and raw label ids."""

    def __init__(
        self,
        examples: Sequence[SegmentationExample],
        class_names: Sequence[str],
        label_mapping: Mapping[int, int],
        ignore_ids: Iterable[int] = (IGNORE_INDEX,),
        strict: bool = False,
    ):
        class_names = [str(name) for name in class_names]
        if not class_names:
            raise ValueError("`class_names` must name at least one class.")
        if len(set(class_names)) != len(class_names):
            duplicates = sorted({name for name in class_names if class_names.count(name) > 1})
            raise ValueError(f"`class_names` must be unique; repeated: {duplicates}.")
        self.examples = list(examples)
        self.class_names = class_names
        self.label_mapping = dict(label_mapping)
        self.ignore_ids = tuple(sorted(set(ignore_ids)))
        self.strict = strict
        self.ignore_index = ignore_index_for(len(class_names))
        lut = np.full(_LUT_SIZE, _UNKNOWN, dtype=np.int64)
        for raw_id in self.ignore_ids:
            lut[raw_id] = self.ignore_index
        for raw_id, class_index in self.label_mapping.items():
            if not (class_index == BACKGROUND_INDEX or 0 <= class_index < len(class_names)):
                raise ValueError(
                    f"label id {raw_id} maps to class index {class_index}, outside [0, {len(class_names)})."
                )
            lut[raw_id] = class_index
        self._lut = lut

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} examples, {self.num_classes} classes)"

    def map_label(self, raw_ids: np.ndarray, source: str = "label map") -> np.ndarray:
        """Raw label ids -> ``int64`` class indices (``BACKGROUND_INDEX`` / ``ignore_index`` as documented)."""
        raw_ids = np.asarray(raw_ids)
        if raw_ids.dtype.kind not in "ui":
            raise ValueError(f"{source} must hold integer label ids, got dtype {raw_ids.dtype}.")
        in_range = (raw_ids >= 0) & (raw_ids < _LUT_SIZE)
        if in_range.all():
            mapped = self._lut[raw_ids]
        else:
            mapped = np.full(raw_ids.shape, _UNKNOWN, dtype=np.int64)
            mapped[in_range] = self._lut[raw_ids[in_range]]
        unknown = mapped == _UNKNOWN
        if unknown.any():
            if self.strict:
                bad_ids = np.unique(raw_ids[unknown])
                raise ValueError(
                    f"{source} holds label ids {bad_ids[:10].tolist()} that name no class of this dataset "
                    f"({self.num_classes} classes; ignore ids {list(self.ignore_ids)})."
                )
            mapped[unknown] = self.ignore_index
        return mapped

    def load_image(self, index: int) -> np.ndarray:
        """RGB ``uint8`` ``[H, W, 3]`` of example ``index``."""
        return read_image(self.examples[index].image_path)

    def load_label(self, index: int) -> np.ndarray:
        """``int64`` ``[H, W]`` class indices of example ``index``."""
        path = self.examples[index].label_path
        return self.map_label(read_label_ids(path), source=f"label map {path}")

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and class-index label map, checked to have the same size."""
        image = self.load_image(index)
        label = self.load_label(index)
        if image.shape[:2] != label.shape:
            example = self.examples[index]
            raise ValueError(
                f"image {example.image_path} is {image.shape[1]}x{image.shape[0]} but its label map "
                f"{example.label_path} is {label.shape[1]}x{label.shape[0]}."
            )
        return image, label

    def _init_from_vocabulary(
        self,
        examples: Sequence[SegmentationExample],
        class_names: Sequence[str] | None,
        vocabulary: Vocabulary,
        root: Path,
        split: str,
    ) -> None:
        """A benchmark reader's setup: raw ids and ignored values from `vocabulary`; `class_names` (other wording
        for the same classes, one per class in label order) or the vocabulary's names."""
        if class_names is not None and len(class_names) != len(vocabulary):
            raise ValueError(
                f"`class_names` for {self.name} must hold {len(vocabulary)} names (one per class of the "
                f"{vocabulary.name!r} vocabulary, in label order), got {len(class_names)}."
            )
        mapping = {raw_id: class_index for class_index, raw_id in enumerate(vocabulary.label_ids)}
        # the vocabulary's unlabeled and background values, and 255 (every benchmark's "ignore" value)
        ignored = {IGNORE_INDEX, vocabulary.ignore_label, vocabulary.background_label} - {None}
        names = vocabulary.class_names if class_names is None else class_names
        SegmentationReader.__init__(self, examples, names, mapping, ignore_ids=ignored)
        self.root, self.split = root, split

    def load_validation_example(self, index: int) -> ValidationExample:
        """Full image + label map of example ``index`` without augmentation (for evaluation)."""
        image, label = self.load_pair(index)
        return ValidationExample(
            image=image,
            label=label,
            class_names=list(self.class_names),
            image_path=self.examples[index].image_path,
            ignore_index=self.ignore_index,
        )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected the folder {path}.")
    return path


def _files_by_stem(folder: Path, extensions: Sequence[str], suffix: str = "") -> dict[str, Path]:
    """``stem -> path`` of the files in ``folder`` named ``<stem><suffix><ext>``; duplicate stems raise."""
    files: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_file():
                continue
            name = entry.name
            base, ext = os.path.splitext(name)
            if ext.lower() not in extensions or not base.endswith(suffix):
                continue
            stem = base[: len(base) - len(suffix)] if suffix else base
            if stem in files:
                raise ValueError(f"two files in {folder} share the stem {stem!r}: {files[stem].name} and {name}.")
            files[stem] = Path(entry.path)
    return files


def _pair_by_stem(
    images: Mapping[str, Path], labels: Mapping[str, Path], image_dir: Path, label_dir: Path
) -> list[SegmentationExample]:
    """One example per image, sorted by stem; an image without a label map raises, an unused label map warns."""
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {image_dir}.")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in {image_dir} have no label map in {label_dir}, e.g. {missing[:5]}."
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        logger.warning(f"{len(orphans)} label map(s) in {label_dir} have no image and are unused, e.g. {orphans[:5]}.")
    return [SegmentationExample(str(images[stem]), str(labels[stem])) for stem in sorted(images)]


def _pair_folders(image_dir: Path, label_dir: Path) -> list[SegmentationExample]:
    """`_pair_by_stem` of the images in `image_dir` and the PNG label maps in `label_dir`."""
    return _pair_by_stem(
        _files_by_stem(image_dir, IMAGE_EXTENSIONS), _files_by_stem(label_dir, (".png",)), image_dir, label_dir
    )


def _canonical_split(split: str, aliases: Mapping[str, str], dataset: str) -> str:
    if split not in aliases:
        raise ValueError(f"`split` for {dataset} must be one of {sorted(aliases)}, got {split!r}.")
    return aliases[split]


def read_class_names_file(path: str | os.PathLike) -> list[str]:
    """``classes.txt``: one class name per line; trailing empty lines are allowed, inner ones are not."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a folder dataset needs a classes.txt with one class name per line "
            f"(line 1 = label id 1)."
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path} names no class.")
    empty = [number for number, line in enumerate(lines, start=1) if not line]
    if empty:
        raise ValueError(f"{path} has empty line(s) {empty[:5]}; every line must name one class.")
    duplicates = sorted({line for line in lines if lines.count(line) > 1})
    if duplicates:
        raise ValueError(f"{path} repeats class name(s) {duplicates}.")
    return lines


class FolderReader(SegmentationReader):
    """The generic folder format (see ``docs/data_format.md``)::

        root/classes.txt                   one class name per line
        root/<split>/images/<stem>.png|jpg|jpeg
        root/<split>/labels/<stem>.png     single-channel, 8- or 16-bit

    Label values: ``0`` = background (valid, no class), ``i`` = the class on line ``i`` of ``classes.txt``,
    ``255`` = ignore (``65535`` when there are 255 classes or more, with 16-bit label maps). Any other value
    makes that label map invalid.
    """

    name = "folder"

    def __init__(self, root: str | os.PathLike, split: str = "train", class_names: Sequence[str] | None = None):
        root = _require_dir(Path(root), "dataset root")
        file_class_names = read_class_names_file(root / "classes.txt")
        class_names = file_class_names if class_names is None else list(class_names)
        if len(class_names) != len(file_class_names):
            raise ValueError(
                f"`class_names` has {len(class_names)} names but {root / 'classes.txt'} lists "
                f"{len(file_class_names)} classes."
            )
        split_dir = root / split
        if not split_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
            raise FileNotFoundError(f"split {split!r} not found: no folder {split_dir}; available splits: {available}.")
        image_dir = _require_dir(split_dir / "images", f"images of split {split!r}")
        label_dir = _require_dir(split_dir / "labels", f"label maps of split {split!r}")
        examples = _pair_folders(image_dir, label_dir)
        num_classes = len(class_names)
        mapping = {0: BACKGROUND_INDEX, **{i + 1: i for i in range(num_classes)}}
        super().__init__(
            examples, class_names, mapping, ignore_ids=(ignore_index_for(num_classes),), strict=True
        )
        self.root, self.split = root, split


def _resolve_root(root: Path, marker: str, nested: str) -> Path:
    """Accept either the dataset folder itself or its parent (``<parent>/<nested>``)."""
    if (root / marker).exists():
        return root
    if (root / nested / marker).exists():
        return root / nested
    raise FileNotFoundError(
        f"{root} does not look like {nested}: neither {root / marker} nor {root / nested / marker} exists."
    )


class ADE20KReader(SegmentationReader):
    """ADE20K SceneParsing (``ADEChallengeData2016``): ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``.

    Raw id 0 ("other") is ignored, ids 1..150 are the classes of the ``ade20k-150`` vocabulary. Splits
    ``training``/``validation`` (aliases ``train``/``val``). ``root`` may be ``ADEChallengeData2016`` or its parent.
    """

    name = "ade20k"
    vocabulary_name = "ade20k-150"
    _SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: str | os.PathLike, split: str = "training", class_names: Sequence[str] | None = None):
        split = _canonical_split(split, self._SPLITS, "ADE20K")
        root = _resolve_root(Path(root), "images", "ADEChallengeData2016")
        image_dir = _require_dir(root / "images" / split, "ADE20K images")
        label_dir = _require_dir(root / "annotations" / split, "ADE20K annotations")
        examples = _pair_folders(image_dir, label_dir)
        self._init_from_vocabulary(examples, class_names, load_vocabulary(self.vocabulary_name), root, split)


class COCOStuffReader(SegmentationReader):
    """COCO-Stuff 164k: ``images/<split>/*.jpg`` with either

    - ``stuffthingmaps_trainval2017/<split>/<stem>.png`` or ``annotations/<split>/<stem>.png`` (the released
      raw maps: 0-based category ids 0..181, 255 unlabelled; mapped to the 171 classes of the ``coco-stuff-171``
      vocabulary, whose ids skip the 11 unused ones), or
    - ``annotations/<split>/<stem>_labelTrainIds.png`` (mmsegmentation's converted maps: ids 0..170).

    Splits ``train2017``/``val2017`` (aliases ``train``/``val``). 255 is ignored.
    """

    name = "coco_stuff"
    vocabulary_name = "coco-stuff-171"
    _SPLITS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}

    def __init__(self, root: str | os.PathLike, split: str = "train2017", class_names: Sequence[str] | None = None):
        split = _canonical_split(split, self._SPLITS, "COCO-Stuff")
        root = _require_dir(Path(root), "COCO-Stuff root")
        image_dir = _require_dir(root / "images" / split, "COCO-Stuff images")
        images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
        raw_dir = root / "stuffthingmaps_trainval2017" / split
        converted_dir = root / "annotations" / split
        uses_train_ids = False
        if raw_dir.is_dir():
            label_dir, labels = raw_dir, _files_by_stem(raw_dir, (".png",))
        elif converted_dir.is_dir():
            label_dir = converted_dir
            labels = _files_by_stem(converted_dir, (".png",), suffix="_labelTrainIds")
            uses_train_ids = bool(labels)
            if not uses_train_ids:
                labels = _files_by_stem(converted_dir, (".png",))
        else:
            raise FileNotFoundError(f"COCO-Stuff label maps not found: expected {raw_dir} or {converted_dir}.")
        examples = _pair_by_stem(images, labels, image_dir, label_dir)
        vocabulary = load_vocabulary(self.vocabulary_name)
        if uses_train_ids:
            vocabulary = vocabulary.with_contiguous_ids()
        self._init_from_vocabulary(examples, class_names, vocabulary, root, split)
        self.uses_train_ids = uses_train_ids


class CityscapesReader(SegmentationReader):
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (19 classes, 255 ignored).

    ``label_type="labelIds"`` reads the raw ``*_gtFine_labelIds.png`` instead, through the official labelId of
    each class (the ``label_id`` column of the ``cityscapes-19`` vocabulary), for copies where
    ``createTrainIdLabelImgs`` was never run; every other labelId is ignored.
    """

    name = "cityscapes"
    vocabulary_name = "cityscapes-19"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        label_type: str = "labelTrainIds",
    ):
        if label_type not in ("labelTrainIds", "labelIds"):
            raise ValueError(f"`label_type` must be 'labelTrainIds' or 'labelIds', got {label_type!r}.")
        root = _require_dir(Path(root), "Cityscapes root")
        image_root = _require_dir(root / "leftImg8bit" / split, f"Cityscapes images of split {split!r}")
        label_root = _require_dir(root / "gtFine" / split, f"Cityscapes gtFine labels of split {split!r}")
        examples: list[SegmentationExample] = []
        cities = sorted(p.name for p in image_root.iterdir() if p.is_dir())
        if not cities:
            raise ValueError(f"no city folders found in {image_root}.")
        for city in cities:
            image_dir, label_dir = image_root / city, label_root / city
            images = _files_by_stem(image_dir, (".png",), suffix="_leftImg8bit")
            labels = (
                _files_by_stem(label_dir, (".png",), suffix=f"_gtFine_{label_type}") if label_dir.is_dir() else {}
            )
            examples.extend(_pair_by_stem(images, labels, image_dir, label_dir))
        vocabulary = load_vocabulary(self.vocabulary_name)
        if label_type == "labelIds":
            vocabulary = vocabulary.with_alternate_ids("label_id")
        self._init_from_vocabulary(examples, class_names, vocabulary, root, split)
        self.label_type = label_type


class PascalContextReader(SegmentationReader):
    """Pascal Context, 59 classes, in the layout mmsegmentation uses (``VOCdevkit/VOC2010``)::

        JPEGImages/<stem>.jpg
        SegmentationClassContext/<stem>.png      0 = background (ignored), 1..59 = classes 0..58 of the
                                                 ``pascal-context-59`` vocabulary (the converter's order)
        ImageSets/SegmentationContext/<split>.txt

    ``root`` may be ``VOC2010``, ``VOCdevkit`` or their parent.
    """

    name = "pascal_context"
    vocabulary_name = "pascal-context-59"

    def __init__(self, root: str | os.PathLike, split: str = "train", class_names: Sequence[str] | None = None):
        root = Path(root)
        for candidate in (root, root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
            if (candidate / "JPEGImages").is_dir():
                root = candidate
                break
        else:
            raise FileNotFoundError(f"{root} does not look like Pascal Context: no JPEGImages folder found.")
        split_file = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"split {split!r} not found: expected the list {split_file}.")
        stems = [line.strip() for line in split_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not stems:
            raise ValueError(f"{split_file} lists no images.")
        image_dir = root / "JPEGImages"
        label_dir = _require_dir(root / "SegmentationClassContext", "Pascal Context label maps")
        checks = ((label_dir, ".png", "have no label map in"), (image_dir, ".jpg", "are missing from"))
        for folder, suffix, problem in checks:
            missing = [stem for stem in stems if not (folder / f"{stem}{suffix}").is_file()]
            if missing:
                raise ValueError(f"{len(missing)} image(s) of {split_file} {problem} {folder}, e.g. {missing[:5]}.")
        examples = [SegmentationExample(str(image_dir / f"{s}.jpg"), str(label_dir / f"{s}.png")) for s in stems]
        self._init_from_vocabulary(examples, class_names, load_vocabulary(self.vocabulary_name), root, split)


READERS: dict[str, type[SegmentationReader]] = {
    "folder": FolderReader,
    "ade20k": ADE20KReader,
    "coco_stuff": COCOStuffReader,
    "cityscapes": CityscapesReader,
    "pascal_context": PascalContextReader,
}


def build_reader(
    dataset_format: str, root: str | os.PathLike, split: str | None = None, **kwargs
) -> SegmentationReader:
    """A reader by format name (``READERS``); ``split=None`` uses the reader's default (its training split)."""
    if dataset_format not in READERS:
        raise ValueError(f"`dataset_format` must be one of {sorted(READERS)}, got {dataset_format!r}.")
    reader_cls = READERS[dataset_format]
    if split is not None:
        kwargs["split"] = split
    return reader_cls(root, **kwargs)
