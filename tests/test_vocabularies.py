import numpy as np
import pytest
import torch

from digseg_diffusers.vocabularies import (
    IGNORE_INDEX,
    LARGE_IGNORE_INDEX,
    Vocabulary,
    list_vocabularies,
    load_vocabulary,
)

EXPECTED_SIZES = {
    "ade20k-150": 150,
    "ade20k-847": 847,
    "pascal-context-59": 59,
    "pascal-context-459": 459,
    "coco-stuff-171": 171,
    "cityscapes-19": 19,
    "pascal-voc-20": 20,
}


def test_list_vocabularies_names_every_bundled_vocabulary():
    assert sorted(list_vocabularies()) == sorted(EXPECTED_SIZES)


@pytest.mark.parametrize("name,size", sorted(EXPECTED_SIZES.items()))
def test_sizes_names_and_ids(name, size):
    vocab = load_vocabulary(name)
    assert vocab.name == name
    assert len(vocab) == vocab.num_classes == size
    assert len(vocab.label_ids) == size
    assert all(n and n == n.strip() for n in vocab.class_names)
    assert len(set(vocab.class_names)) == size, "duplicate class names"
    assert len(set(vocab.label_ids)) == size, "duplicate label ids"
    assert vocab.ignore_label not in vocab.label_ids
    assert vocab.background_label is None or vocab.background_label not in vocab.label_ids
    assert vocab.sources


@pytest.mark.parametrize(
    "name,first,last,ids",
    [
        ("ade20k-150", "wall", "flag", (1, 150)),
        ("pascal-context-59", "aeroplane", "wood", (1, 59)),
        ("pascal-context-459", "accordion", "wool", (1, 459)),
        ("coco-stuff-171", "person", "wood", (0, 181)),
        ("cityscapes-19", "road", "bicycle", (0, 18)),
        ("pascal-voc-20", "aeroplane", "tvmonitor", (1, 20)),
    ],
)
def test_known_ends_and_id_ranges(name, first, last, ids):
    vocab = load_vocabulary(name)
    assert vocab.class_names[0] == first and vocab.class_names[-1] == last
    assert (min(vocab.label_ids), max(vocab.label_ids)) == ids


def test_coco_stuff_skips_the_eleven_unused_ids():
    vocab = load_vocabulary("coco-stuff-171")
    assert sorted(set(range(182)) - set(vocab.label_ids)) == [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert vocab.label_ids[vocab.index("stop sign")] == 12


def test_pascal_context_59_is_a_subset_of_459():
    pc59, pc459 = load_vocabulary("pc-59"), load_vocabulary("pc-459")
    assert set(pc59.class_names) <= set(pc459.class_names)
    # mmseg's converter keeps the 459-id order, so the 59 classes appear in the same relative order
    positions = [pc459.index(n) for n in pc59.class_names]
    assert positions == sorted(positions)


def test_pascal_context_59_ids_are_the_converters_key():
    """mmseg tools/dataset_converters/pascal_context.py numbers the kept PC-459 ids (0 = background) in sorted order."""
    converter_mapping = [
        0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295,
        296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347,
        220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
    ]  # fmt: skip
    pc59, pc459 = load_vocabulary("pc-59"), load_vocabulary("pc-459")
    key = sorted(converter_mapping)
    assert pc59.label_ids == [key.index(i) for i in pc59.alternate_ids["pc459_id"]]
    assert pc59.class_names == [pc459.class_names[pc459.label_ids.index(i)] for i in key[1:]]


def test_ade847_synonyms_split_wordnet_lists():
    vocab = load_vocabulary("a-847")
    assert vocab.class_names[1] == "building, edifice"
    assert vocab.synonyms[1] == ["building", "edifice"]
    assert vocab.synonyms[0] == ["wall"]


@pytest.mark.parametrize(
    "alias,name",
    [("A-150", "ade20k-150"), ("a_847", "ade20k-847"), ("PC-59", "pascal-context-59"), ("pc459", "pascal-context-459"),
     ("coco stuff", "coco-stuff-171"), ("Cityscapes", "cityscapes-19"), ("voc", "pascal-voc-20")],
)
def test_aliases(alias, name):
    assert load_vocabulary(alias).name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown vocabulary 'ade30k'.*ade20k-150.*pascal-voc-20"):
        load_vocabulary("ade30k")


def test_map_labels_ade150_shifts_and_ignores_zero():
    vocab = load_vocabulary("ade20k-150")
    raw = np.array([[0, 1, 2], [150, 149, 0]], dtype=np.uint8)
    expected = np.array([[IGNORE_INDEX, 0, 1], [149, 148, IGNORE_INDEX]])
    mapped = vocab.map_labels(raw)
    assert mapped.dtype == np.int64
    np.testing.assert_array_equal(mapped, expected)


def test_map_labels_coco_stuff_and_voc_background():
    coco = load_vocabulary("coco-stuff-171")
    raw = np.array([0, 11, 12, 181, 255, 200])
    np.testing.assert_array_equal(coco.map_labels(raw), [0, 255, 11, 170, 255, 255])
    voc = load_vocabulary("pascal-voc-20")
    np.testing.assert_array_equal(voc.map_labels(np.array([0, 1, 20, 255])), [255, 0, 19, 255])


def test_map_labels_torch_and_large_vocabularies():
    vocab = load_vocabulary("ade20k-847")
    assert vocab.ignore_index == LARGE_IGNORE_INDEX
    wall, edifice = vocab.label_ids[0], vocab.label_ids[1]
    raw = torch.tensor([[wall, edifice], [0, 5000]], dtype=torch.int32)
    mapped = vocab.map_labels(raw)
    assert isinstance(mapped, torch.Tensor) and mapped.dtype == torch.int64
    assert mapped.tolist() == [[0, 1], [LARGE_IGNORE_INDEX, LARGE_IGNORE_INDEX]]
    # class index 255 is a real class here and must survive the mapping
    assert vocab.map_labels(np.array([vocab.label_ids[255]])).tolist() == [255]


def test_map_labels_rejects_float_maps():
    with pytest.raises(ValueError, match="label_map must hold integers"):
        load_vocabulary("cityscapes").map_labels(np.zeros((2, 2), dtype=np.float32))


def test_with_contiguous_ids_reads_prepared_annotations():
    vocab = load_vocabulary("pascal-context-459").with_contiguous_ids()
    assert vocab.label_ids == list(range(459)) and vocab.ignore_label == LARGE_IGNORE_INDEX
    raw = np.array([0, 458, 65535], dtype=np.uint16)
    np.testing.assert_array_equal(vocab.map_labels(raw), [0, 458, LARGE_IGNORE_INDEX])


def test_vocabulary_validates_its_fields():
    with pytest.raises(ValueError, match="same length"):
        Vocabulary("x", ["a", "b"], [1])
    with pytest.raises(ValueError, match="duplicates"):
        Vocabulary("x", ["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="background_label 1 of vocabulary 'x' is also the label id of a class"):
        Vocabulary("x", ["a", "b"], [1, 2], background_label=1)


def test_alternate_id_columns_are_loaded():
    assert load_vocabulary("pc-59").alternate_ids["pc459_id"][:3] == [2, 9, 18]  # aeroplane, bag, bed in PC-459
    assert load_vocabulary("a-847").alternate_ids["train_id"] == list(range(847))
    assert load_vocabulary("ade20k-150").alternate_ids == {}


def test_cityscapes_label_ids_follow_cityscapes_scripts():
    vocab = load_vocabulary("cityscapes").with_alternate_ids("label_id")
    # cityscapesScripts labels.py: road 7, car 26, bicycle 33; the trainIds stay the class indices
    assert [vocab.label_ids[vocab.index(n)] for n in ("road", "car", "bicycle")] == [7, 26, 33]
    np.testing.assert_array_equal(vocab.map_labels(np.array([7, 26, 33, 0, 9])), [0, 13, 18, 255, 255])
    with pytest.raises(ValueError, match="no id column 'train_id'; its other id columns: label_id"):
        vocab.with_alternate_ids("train_id")
    # A-847's train_ids are contiguous, so its unlabeled value 0 would become a class: with_contiguous_ids is the way
    with pytest.raises(ValueError, match="ignore_label 0 of vocabulary 'ade20k-847' is also the label id of a class"):
        load_vocabulary("a-847").with_alternate_ids("train_id")


def test_subset_keeps_alternate_ids():
    vocab = load_vocabulary("pc-59").subset(["bag", "aeroplane"])
    assert vocab.label_ids == [2, 1] and vocab.alternate_ids["pc459_id"] == [9, 2]
    with pytest.raises(ValueError, match="alternate_ids\\['x'\\] \\(1\\) and class_names \\(2\\)"):
        Vocabulary("x", ["a", "b"], [1, 2], alternate_ids={"x": [1]})
