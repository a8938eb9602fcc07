import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digseg_diffusers.data import (
    BACKGROUND_INDEX,
    IGNORE_INDEX,
    READERS,
    ADE20KReader,
    CityscapesReader,
    COCOStuffReader,
    FolderReader,
    PascalContextReader,
    SegmentationTrainingDataset,
    build_reader,
    collate_segmentation_batch,
    crop_is_fixed,
    random_scale_flip_crop,
)
from digseg_diffusers.data.synthetic import SHAPE_CLASSES, SPLIT_SEED_OFFSETS, generate_scene, write_dataset
from digseg_diffusers.vocabularies import load_vocabulary


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(root, "train", num_images=12, size=32)
    return root


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _make_folder_dataset(root: Path, labels: list[np.ndarray], classes=("cat", "dog", "sky")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    for i, label in enumerate(labels):
        _save(root / "train" / "images" / f"im{i}.png", rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8))
        _save(root / "train" / "labels" / f"im{i}.png", label)
    return root


def _no_augmentation(reader, resolution, **kwargs):
    return SegmentationTrainingDataset(
        reader, resolution=resolution, scale_range=(1.0, 1.0), flip_prob=0.0, resize_short_side=False, **kwargs
    )


# ---------------------------------------------------------------- generic folder format


def test_synthetic_folder_reads_back(synthetic_root):
    reader = FolderReader(synthetic_root, "train")
    assert len(reader) == 12
    assert reader.class_names == list(SHAPE_CLASSES)
    assert reader.ignore_index == IGNORE_INDEX
    example = reader.load_validation_example(0)
    scene = generate_scene(SPLIT_SEED_OFFSETS["train"], size=32)
    np.testing.assert_array_equal(example.image, scene.image)
    expected = scene.label.astype(np.int64) - 1  # 0 (background) -> -1, c + 1 -> c
    assert BACKGROUND_INDEX == -1
    np.testing.assert_array_equal(example.label, expected)
    assert example.class_names == list(SHAPE_CLASSES)
    assert Path(example.image_path).name == Path(reader[0].image_path).name
    assert build_reader("folder", synthetic_root, "train").examples == reader.examples


def test_folder_format_errors_are_clear(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    root = _make_folder_dataset(tmp_path / "ok", [label])
    with pytest.raises(FileNotFoundError, match="available splits: \\['train'\\]"):
        FolderReader(root, "val")
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        FolderReader(root, "train")

    root = _make_folder_dataset(tmp_path / "orphan", [label, label])
    (root / "train" / "labels" / "im1.png").unlink()
    with pytest.raises(ValueError, match="have no label map.*im1"):
        FolderReader(root, "train")

    root = _make_folder_dataset(tmp_path / "dup", [label], classes=("cat", "dog", "cat"))
    with pytest.raises(ValueError, match="repeats"):
        FolderReader(root, "train")


def test_folder_label_values(tmp_path):
    label = np.array([[0, 1, 2, 3], [255, 255, 0, 3]], np.uint8)
    reader = FolderReader(_make_folder_dataset(tmp_path / "a", [label]), "train")
    np.testing.assert_array_equal(reader.load_label(0), [[-1, 0, 1, 2], [255, 255, -1, 2]])

    bad = np.array([[0, 7]], np.uint8)  # 7 names no class of 3
    reader = FolderReader(_make_folder_dataset(tmp_path / "b", [bad]), "train")
    with pytest.raises(ValueError, match="label ids \\[7\\]"):
        reader.load_label(0)

    root = _make_folder_dataset(tmp_path / "c", [label])
    _save(root / "train" / "labels" / "im0.png", np.zeros((2, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="single-channel"):
        FolderReader(root, "train").load_label(0)

    label16 = np.array([[0, 2, 3]], np.uint16)  # 16-bit label maps are read too
    root = _make_folder_dataset(tmp_path / "d", [np.zeros((1, 3), np.uint8)])
    Image.fromarray(label16).save(root / "train" / "labels" / "im0.png")
    np.testing.assert_array_equal(FolderReader(root, "train").load_label(0), [[-1, 1, 2]])


# ---------------------------------------------------------------- standard layouts


def test_ade20k_layout(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _save(base / "images" / "training" / "ADE_train_1.jpg", np.zeros((4, 4, 3), np.uint8))
    _save(base / "annotations" / "training" / "ADE_train_1.png", np.array([[0, 1, 150, 255]], np.uint8))
    reader = ADE20KReader(tmp_path, "train")  # parent folder and split alias accepted
    assert len(reader) == 1 and reader.num_classes == 150 and reader.class_names[0] == "wall"
    np.testing.assert_array_equal(reader.map_label(np.array([[0, 1, 150, 255]], np.uint8)), [[255, 0, 149, 255]])
    with pytest.raises(ValueError, match="split"):
        ADE20KReader(base, "test")


def test_coco_stuff_layouts(tmp_path):
    raw_root = tmp_path / "raw"
    _save(raw_root / "images" / "val2017" / "000000000139.jpg", np.zeros((4, 4, 3), np.uint8))
    _save(raw_root / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", np.zeros((4, 4), np.uint8))
    reader = COCOStuffReader(raw_root, "val")
    assert len(reader) == 1 and reader.num_classes == 171 and not reader.uses_train_ids
    # raw ids skip the 11 unused COCO thing ids: 12 -> class 11, 181 -> class 170, 11 (unused) -> ignore
    mapped = reader.map_label(np.array([0, 10, 12, 181, 11, 255], np.uint8))
    np.testing.assert_array_equal(mapped, [0, 10, 11, 170, 255, 255])
    assert reader.class_names[11] == "stop sign" and reader.class_names[170] == "wood"

    converted = tmp_path / "converted"
    _save(converted / "images" / "train2017" / "a.jpg", np.zeros((4, 4, 3), np.uint8))
    _save(converted / "annotations" / "train2017" / "a_labelTrainIds.png", np.zeros((4, 4), np.uint8))
    reader = COCOStuffReader(converted, "train2017")
    assert reader.uses_train_ids and Path(reader[0].label_path).name == "a_labelTrainIds.png"
    np.testing.assert_array_equal(reader.map_label(np.array([11, 170, 255], np.uint8)), [11, 170, 255])


def test_cityscapes_layout(tmp_path):
    for city in ("aachen", "bremen"):
        name = f"{city}_000000_000019"
        _save(tmp_path / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png", np.zeros((4, 8, 3), np.uint8))
        _save(tmp_path / "gtFine" / "train" / city / f"{name}_gtFine_labelTrainIds.png", np.zeros((4, 8), np.uint8))
        _save(tmp_path / "gtFine" / "train" / city / f"{name}_gtFine_labelIds.png", np.full((4, 8), 26, np.uint8))
    reader = CityscapesReader(tmp_path, "train")
    assert len(reader) == 2 and reader.num_classes == 19
    assert Path(reader[1].label_path).name == "bremen_000000_000019_gtFine_labelTrainIds.png"
    raw = CityscapesReader(tmp_path, "train", label_type="labelIds")
    assert set(np.unique(raw.load_label(0)).tolist()) == {reader.class_names.index("car")}
    np.testing.assert_array_equal(raw.map_label(np.array([0, 7, 33], np.uint8)), [255, 0, 18])


def test_pascal_context_layout(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    _save(voc / "JPEGImages" / "2008_000002.jpg", np.zeros((4, 4, 3), np.uint8))
    _save(voc / "SegmentationClassContext" / "2008_000002.png", np.zeros((4, 4), np.uint8))
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    reader = build_reader("pascal_context", tmp_path, "val")
    assert isinstance(reader, PascalContextReader) and len(reader) == 1 and reader.num_classes == 59
    np.testing.assert_array_equal(reader.map_label(np.array([0, 1, 59], np.uint8)), [255, 0, 58])
    with pytest.raises(FileNotFoundError, match="train.txt"):
        PascalContextReader(tmp_path, "train")
    with pytest.raises(ValueError, match="59 names"):
        PascalContextReader(tmp_path, "val", class_names=["a", "b"])


def test_pascal_context_names_follow_the_converter_order(tmp_path):
    """mmseg's converter writes the 59 classes in sorted PC-459 id order (alphabetical): raw 2 is a bag, 6 a bicycle."""
    voc = tmp_path / "VOC2010"
    _save(voc / "JPEGImages" / "a.jpg", np.zeros((1, 4, 3), np.uint8))
    _save(voc / "SegmentationClassContext" / "a.png", np.array([[2, 6, 50, 59]], np.uint8))
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (voc / "ImageSets" / "SegmentationContext" / "train.txt").write_text("a\n")
    reader = PascalContextReader(tmp_path, "train")
    names = [reader.class_names[k] for k in reader.load_label(0)[0]]
    assert names == ["bag", "bicycle", "table", "wood"]


def _benchmark_layout(dataset_format: str, root: Path, **reader_kwargs):
    """The smallest on-disk layout each benchmark reader accepts (one image, one label map of zeros)."""
    image, label = np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8)
    if dataset_format == "ade20k":
        _save(root / "images" / "training" / "a.jpg", image)
        _save(root / "annotations" / "training" / "a.png", label)
    elif dataset_format == "coco_stuff":
        _save(root / "images" / "train2017" / "a.jpg", image)
        _save(root / "stuffthingmaps_trainval2017" / "train2017" / "a.png", label)
    elif dataset_format == "cityscapes":
        _save(root / "leftImg8bit" / "train" / "aachen" / "a_leftImg8bit.png", image)
        for label_type in ("labelTrainIds", "labelIds"):
            _save(root / "gtFine" / "train" / "aachen" / f"a_gtFine_{label_type}.png", label)
    elif dataset_format == "pascal_context":
        _save(root / "JPEGImages" / "a.jpg", image)
        _save(root / "SegmentationClassContext" / "a.png", label)
        (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
        (root / "ImageSets" / "SegmentationContext" / "train.txt").write_text("a\n")
    return build_reader(dataset_format, root, **reader_kwargs)


BENCHMARK_FORMATS = sorted(name for name in READERS if name != "folder")


def test_every_benchmark_reader_names_its_vocabulary():
    assert BENCHMARK_FORMATS == ["ade20k", "cityscapes", "coco_stuff", "pascal_context"]
    for name in BENCHMARK_FORMATS:
        assert load_vocabulary(READERS[name].vocabulary_name).name == READERS[name].vocabulary_name
    assert FolderReader.vocabulary_name is None  # its names come from classes.txt


@pytest.mark.parametrize("dataset_format", BENCHMARK_FORMATS)
def test_reader_defaults_are_its_vocabulary(dataset_format, tmp_path):
    """Default names and raw ids come from the vocabulary: one table, so the reader cannot drift from it."""
    reader = _benchmark_layout(dataset_format, tmp_path)
    vocabulary = load_vocabulary(reader.vocabulary_name)
    assert reader.class_names == vocabulary.class_names
    assert reader.label_mapping == {raw_id: k for k, raw_id in enumerate(vocabulary.label_ids)}
    assert reader.ignore_index == vocabulary.ignore_index
    unlisted = [i for i in (vocabulary.ignore_label, vocabulary.background_label) if i is not None]
    assert (reader.map_label(np.array(unlisted, np.uint8)) == reader.ignore_index).all()


@pytest.mark.parametrize(
    "dataset_format,reader_kwargs,raw_ids,names",
    [
        ("ade20k", {}, [1, 8, 150], ["wall", "bed", "flag"]),
        ("coco_stuff", {}, [0, 12, 181], ["person", "stop sign", "wood"]),
        ("cityscapes", {}, [0, 13, 18], ["road", "car", "bicycle"]),
        ("cityscapes", {"label_type": "labelIds"}, [7, 26, 33], ["road", "car", "bicycle"]),
        ("pascal_context", {}, [1, 2, 6], ["aeroplane", "bag", "bicycle"]),
    ],
)
def test_reader_raw_ids_name_the_published_classes(dataset_format, reader_kwargs, raw_ids, names, tmp_path):
    """Spot checks against the datasets' own tools (mmseg converters, cityscapesScripts labels.py)."""
    reader = _benchmark_layout(dataset_format, tmp_path, **reader_kwargs)
    assert [reader.class_names[k] for k in reader.map_label(np.array(raw_ids, np.uint8))] == names


def test_cityscapes_label_ids_come_from_the_vocabulary(tmp_path):
    reader = _benchmark_layout("cityscapes", tmp_path, label_type="labelIds")
    label_ids = load_vocabulary("cityscapes-19").alternate_ids["label_id"]
    assert reader.label_mapping == {raw_id: k for k, raw_id in enumerate(label_ids)}
    # labelIds of classes outside the 19 (0 unlabeled, 9 parking, 29 caravan) are ignored
    assert (reader.map_label(np.array([0, 9, 29], np.uint8)) == reader.ignore_index).all()


def test_reader_class_names_override_keeps_the_vocabulary_ids(tmp_path):
    names = [f"a photo of {n}" for n in load_vocabulary("pc-59").class_names]
    reader = _benchmark_layout("pascal_context", tmp_path, class_names=names)
    assert reader.class_names[reader.map_label(np.array([2], np.uint8))[0]] == "a photo of bag"
    with pytest.raises(ValueError, match="59 names .*'pascal-context-59' vocabulary"):
        _benchmark_layout("pascal_context", tmp_path / "short", class_names=names[:-1])


# ---------------------------------------------------------------- training samples


def test_training_sample_shapes_and_ranges(synthetic_root):
    dataset = SegmentationTrainingDataset(FolderReader(synthetic_root), resolution=40, negative_prob=0.0)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["pixel_values"].shape == (3, 40, 40) and sample["pixel_values"].dtype == torch.float32
        assert sample["pixel_values"].min() >= -1.0 and sample["pixel_values"].max() <= 1.0
        assert sample["mask"].shape == (1, 40, 40) and sample["valid"].shape == (1, 40, 40)
        assert set(sample["mask"].unique().tolist()) <= {0.0, 1.0}
        assert set(sample["valid"].unique().tolist()) <= {0.0, 1.0}
        assert (sample["mask"] <= sample["valid"]).all()
        assert not sample["is_negative"] and sample["mask"].sum() > 0
        assert sample["class_name"] == SHAPE_CLASSES[sample["class_index"]]
        assert sample["path"] == dataset.reader[index].image_path
    batch = collate_segmentation_batch([dataset[0], dataset[1], dataset[2]])
    assert batch["pixel_values"].shape == (3, 3, 40, 40) and batch["mask"].shape == (3, 1, 40, 40)
    assert batch["class_index"].dtype == torch.long and batch["is_negative"].dtype == torch.bool
    assert len(batch["class_name"]) == 3 and len(batch["path"]) == 3


def test_samples_are_deterministic_per_index_seed_and_epoch(synthetic_root):
    reader = FolderReader(synthetic_root)
    first = SegmentationTrainingDataset(reader, resolution=32, seed=3)
    second = SegmentationTrainingDataset(reader, resolution=32, seed=3)
    order = [5, 2, 9, 0]  # loading order must not matter
    a = {i: first[i] for i in order}
    b = {i: second[i] for i in reversed(order)}
    for i in order:
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) and torch.equal(a[i]["mask"], b[i]["mask"])
        assert a[i]["class_index"] == b[i]["class_index"]

    def signature(dataset):
        return [(dataset[i]["pixel_values"].sum().item(), dataset[i]["class_index"]) for i in range(len(dataset))]

    reference = signature(first)
    assert signature(SegmentationTrainingDataset(reader, resolution=32, seed=4)) != reference
    first.set_epoch(1)
    assert signature(first) != reference


def test_negative_sampling_rate_and_targets(synthetic_root):
    reader = FolderReader(synthetic_root)
    # 20 px crops of 32 px images: a class can be cropped out yet present in the image (not a valid negative)
    dataset = SegmentationTrainingDataset(
        reader, resolution=20, negative_prob=0.3, scale_range=(1.0, 1.0), resize_short_side=False
    )
    negatives = 0
    for epoch in range(20):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            full_label = reader.load_label(index)
            if sample["is_negative"]:
                negatives += 1
                assert sample["mask"].sum() == 0
                assert not (full_label == sample["class_index"]).any()  # absent from the whole image
            else:
                assert sample["mask"].sum() > 0
    rate = negatives / (20 * len(dataset))
    assert 0.2 < rate < 0.4, rate


def test_ignore_and_padding_pixels_are_invalid(tmp_path):
    label = np.zeros((16, 16), np.uint8)
    label[2:10, 3:12] = 1
    label[:, 14:] = 255
    reader = FolderReader(_make_folder_dataset(tmp_path / "ignore", [label]))
    sample = _no_augmentation(reader, 16, negative_prob=0.0)[0]
    np.testing.assert_array_equal(sample["valid"][0].numpy(), (label != 255).astype(np.float32))
    np.testing.assert_array_equal(sample["mask"][0].numpy(), (label == 1).astype(np.float32))

    padded = _no_augmentation(reader, 24, negative_prob=0.0)[0]  # a 16 px image pasted into 24 px
    assert padded["valid"].sum() == (label != 255).sum()
    assert padded["mask"].sum() == (label == 1).sum()
    assert (padded["pixel_values"] == -1.0).all(dim=0).sum() >= 24 * 24 - 16 * 16  # black padding


def test_transform_flip_pad_and_nearest_labels():
    label = np.arange(30).reshape(5, 6) % 4
    image = np.repeat((label * 60).astype(np.uint8)[..., None], 3, axis=2)
    out_image, out_label = random_scale_flip_crop(
        image, label, np.random.default_rng(0), resolution=6, ignore_index=255, scale_range=(1.0, 1.0),
        flip_prob=1.0, resize_short_side=False,
    )
    pad_row = 5 if (out_label[5] == 255).all() else 0  # the 5-row image is pasted at a random row offset
    assert (out_label[pad_row] == 255).all() and (out_image[pad_row] == 0).all()
    top = 0 if pad_row == 5 else 1
    np.testing.assert_array_equal(out_label[top : top + 5], label[:, ::-1])
    np.testing.assert_array_equal(out_image[top : top + 5], image[:, ::-1])
    # upscaling keeps label values exact (nearest), while the image is interpolated (bilinear)
    big_image, big_label = random_scale_flip_crop(
        image, label, np.random.default_rng(1), resolution=64, ignore_index=255, scale_range=(4.0, 4.0),
        flip_prob=0.0, resize_short_side=False,
    )
    assert set(np.unique(big_label).tolist()) == {0, 1, 2, 3, 255}
    assert not set(np.unique(big_image).tolist()) <= {0, 60, 120, 180}
    # resize_short_side: a 5x6 image at resolution 20 and scale 1 becomes 20x24, cropped to 20x20 (no padding)
    _, cropped = random_scale_flip_crop(
        image, label, np.random.default_rng(2), resolution=20, ignore_index=255, scale_range=(1.0, 1.0)
    )
    assert not (cropped == 255).any()


def test_corrupt_files_are_skipped_and_counted(synthetic_root, tmp_path, caplog):
    reader = FolderReader(synthetic_root)
    root = tmp_path / "corrupt"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text((synthetic_root / "classes.txt").read_text())
    for example in reader.examples[:4]:
        for kind, path in (("images", example.image_path), ("labels", example.label_path)):
            (root / "train" / kind / Path(path).name).write_bytes(Path(path).read_bytes())
    broken = sorted((root / "train" / "images").iterdir())[1]
    broken.write_bytes(b"not a png at all")
    truncated = sorted((root / "train" / "labels").iterdir())[3]
    truncated.write_bytes(truncated.read_bytes()[:60])

    dataset = SegmentationTrainingDataset(FolderReader(root), resolution=32)
    samples = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 2
    assert sorted(Path(p).name for p in dataset.skipped_paths) == sorted([broken.name, truncated.name])
    assert samples[1]["index"] == 2 and samples[1]["num_skipped"] == 1
    assert samples[3]["index"] == 0 and samples[3]["num_skipped"] == 1
    assert sum(s["num_skipped"] for s in samples) == 2
    assert [Path(p).name for p in samples[1]["skipped_paths"]] == [broken.name]
    assert [Path(p).name for p in samples[3]["skipped_paths"]] == [truncated.name]  # its label is the bad file
    assert "Skipping unreadable example" in caplog.text

    for path in (root / "train" / "images").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="none of the 4 examples"):
        SegmentationTrainingDataset(FolderReader(root), resolution=32)[0]


def test_dataloader_batches(synthetic_root):
    dataset = SegmentationTrainingDataset(FolderReader(synthetic_root), resolution=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_segmentation_batch)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["valid"].shape == (4, 1, 32, 32)


def test_invalid_dataset_arguments(synthetic_root):
    reader = FolderReader(synthetic_root)
    with pytest.raises(ValueError, match="negative_prob"):
        SegmentationTrainingDataset(reader, negative_prob=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        SegmentationTrainingDataset(reader, scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="resolution"):
        SegmentationTrainingDataset(reader, resolution=0)
    with pytest.raises(ValueError, match="dataset_format"):
        build_reader("voc", synthetic_root)


def test_data_format_doc_example_runs(tmp_path, monkeypatch, capsys):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data_format.md").read_text()
    example = doc.split("### Example\n\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    # Run as a script file (no `exec`: the Comfy registry's scan refuses it in anything a clone ships).
    (tmp_path / "data_format_example.py").write_text(example)
    runpy.run_path(str(tmp_path / "data_format_example.py"), run_name="__main__")
    assert "['cat', 'dog']" in capsys.readouterr().out
    assert len(FolderReader(tmp_path / "my_dataset")) == 1


@pytest.mark.parametrize(
    "height, width, scale_range, flip_prob, resize_short_side, fixed",
    [
        (32, 32, (1.0, 1.0), 0.0, True, True),  # already at the resolution
        (64, 64, (1.0, 1.0), 0.0, True, True),  # scaled down to it, always the same way
        (32, 48, (1.0, 1.0), 0.0, True, False),  # a random window along the long side
        (64, 64, (1.0, 1.0), 0.0, False, False),  # native size: a random 32 px window
        (32, 32, (0.8, 1.2), 0.0, True, False),  # scale jitter
        (32, 32, (1.0, 1.0), 0.5, True, False),  # flips
    ],
)
def test_crop_is_fixed_only_when_the_augmentation_draws_nothing(height, width, scale_range, flip_prob, resize_short_side, fixed):
    assert crop_is_fixed(height, width, 32, scale_range, flip_prob, resize_short_side=resize_short_side) is fixed
    label = np.arange(height * width).reshape(height, width) % 5
    image = np.repeat((label * 50).astype(np.uint8)[..., None], 3, axis=2)
    crops = [
        random_scale_flip_crop(image, label, np.random.default_rng(seed), resolution=32, ignore_index=255,
                               scale_range=scale_range, flip_prob=flip_prob, resize_short_side=resize_short_side)[1]
        for seed in range(8)
    ]  # fmt: skip
    assert all(np.array_equal(crop, crops[0]) for crop in crops) is fixed
