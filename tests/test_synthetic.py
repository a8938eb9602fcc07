import json

import numpy as np
import pytest
from PIL import Image

from digseg_diffusers.data.synthetic import (
    BACKGROUND_LABEL,
    SEEDS_PER_SPLIT,
    SHAPE_CLASSES,
    SPLIT_SEED_OFFSETS,
    generate_scene,
    rasterize_shape,
    split_seeds,
    write_dataset,
)


def test_same_seed_gives_identical_scene():
    first, second = generate_scene(123, size=48), generate_scene(123, size=48)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.label, second.label)
    assert first.objects == second.objects


def test_different_seeds_differ():
    scenes = [generate_scene(seed, size=48) for seed in range(6)]
    for i in range(len(scenes)):
        for j in range(i + 1, len(scenes)):
            assert not np.array_equal(scenes[i].image, scenes[j].image)
    assert len({scene.label.tobytes() for scene in scenes}) == len(scenes)


def test_scene_arrays_and_classes():
    scene = generate_scene(7, size=64, max_objects=4)
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert scene.label.shape == (64, 64) and scene.label.dtype == np.uint8
    values = set(np.unique(scene.label).tolist())
    assert 255 not in values
    assert values - {BACKGROUND_LABEL} == {c + 1 for c in scene.class_indices}
    assert scene.class_names == [SHAPE_CLASSES[c] for c in scene.class_indices]
    assert 1 <= len(scene.objects) <= 4


def test_label_map_matches_drawn_objects():
    """Later shapes occlude earlier ones; the label shows exactly what is visible."""
    for seed in range(20):
        scene = generate_scene(seed, size=48, max_objects=5)
        expected = np.full((48, 48), BACKGROUND_LABEL, dtype=np.uint8)
        for obj in scene.objects:
            expected[rasterize_shape(obj.class_index, obj.center, obj.radius, obj.rotation, 48)] = obj.class_index + 1
        np.testing.assert_array_equal(scene.label, expected)
        # the last drawn shape is fully visible
        last = scene.objects[-1]
        last_mask = rasterize_shape(last.class_index, last.center, last.radius, last.rotation, 48)
        assert (scene.label[last_mask] == last.class_index + 1).all()


def test_every_class_appears_and_colour_does_not_encode_class():
    mean_colors = {c: [] for c in range(len(SHAPE_CLASSES))}
    for seed in range(150):
        scene = generate_scene(seed, size=32)
        for c in scene.class_indices:
            mean_colors[c].append(scene.image[scene.mask(c)].mean(axis=0))
    for c, colors in mean_colors.items():
        assert len(colors) >= 5, f"class {SHAPE_CLASSES[c]} appeared only {len(colors)} times"
        # fills of one class span a wide colour range (drawn independently of the class)
        assert np.ptp(np.stack(colors), axis=0).min() > 100


def test_shapes_differ_from_each_other():
    masks = [rasterize_shape(name, (32.0, 32.0), 20.0, 0.3, 64) for name in SHAPE_CLASSES]
    for i in range(len(masks)):
        assert masks[i].sum() > 100
        for j in range(i + 1, len(masks)):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (SHAPE_CLASSES[i], SHAPE_CLASSES[j], iou)
    ring = rasterize_shape("ring", (32.0, 32.0), 20.0, 0.0, 64)
    assert not ring[32, 32]  # the ring has a hole


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="seed"):
        generate_scene(-1)
    with pytest.raises(ValueError, match="size"):
        generate_scene(0, size=8)
    with pytest.raises(ValueError, match="min_objects"):
        generate_scene(0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="shape"):
        rasterize_shape("hexagon", (0, 0), 1.0, 0.0, 8)


def test_split_seed_ranges_are_disjoint():
    train, val, test = split_seeds("train", 100), split_seeds("val", 100), split_seeds("test", 100)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert val.start == SPLIT_SEED_OFFSETS["val"]
    with pytest.raises(ValueError, match="owns seeds"):
        split_seeds("train", 10, seed_offset=SEEDS_PER_SPLIT - 5)  # would run into the val seeds
    with pytest.raises(ValueError, match="seed_offset"):
        split_seeds("custom", 10)
    assert split_seeds("custom", 3, seed_offset=50_000_000) == range(50_000_000, 50_000_003)


def test_write_dataset_files_match_generator(tmp_path):
    split_dir = write_dataset(tmp_path, "val", num_images=3, size=32)
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(SHAPE_CLASSES)
    stems = sorted(p.stem for p in (split_dir / "images").glob("*.png"))
    assert stems == sorted(p.stem for p in (split_dir / "labels").glob("*.png"))
    assert len(stems) == 3
    seed = SPLIT_SEED_OFFSETS["val"]
    scene = generate_scene(seed, size=32)
    np.testing.assert_array_equal(np.asarray(Image.open(split_dir / "images" / f"{stems[0]}.png")), scene.image)
    np.testing.assert_array_equal(np.asarray(Image.open(split_dir / "labels" / f"{stems[0]}.png")), scene.label)
    metadata = json.loads((split_dir / "synthetic.json").read_text())
    assert metadata["first_seed"] == seed and metadata["num_images"] == 3
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path, "val", num_images=2, size=32)
    write_dataset(tmp_path, "val", num_images=2, size=32, overwrite=True)
    assert len(list((split_dir / "images").glob("*.png"))) == 2


# Digests of the plain style's arrays (image bytes + label bytes) as generator version 2 drew them before
# rendering styles existed: the default style must keep every seed's scene.
PLAIN_SCENE_DIGESTS = {0: "821bee67a593de27", 20_000_000: "d08c73bd7e9804d6"}


def test_plain_style_keeps_generator_version_2_scenes():
    import hashlib

    for seed, digest in PLAIN_SCENE_DIGESTS.items():
        scene = generate_scene(seed, size=32)
        assert hashlib.sha256(scene.image.tobytes() + scene.label.tobytes()).hexdigest()[:16] == digest
        styled_plain = generate_scene(seed, size=32, style="plain")
        np.testing.assert_array_equal(styled_plain.image, scene.image)


@pytest.mark.parametrize("style", ["varied", "shifted"])
def test_styled_scenes_are_deterministic_and_labelled_like_any_scene(style):
    for seed in range(8):
        first, second = generate_scene(seed, size=48, style=style), generate_scene(seed, size=48, style=style)
        np.testing.assert_array_equal(first.image, second.image)
        np.testing.assert_array_equal(first.label, second.label)
        assert first.image.shape == (48, 48, 3) and first.image.dtype == np.uint8
        assert set(np.unique(first.label)) <= set(range(len(SHAPE_CLASSES) + 1))
        for obj in first.objects:  # the label is the geometry: each shape's visible pixels lie inside it
            inside = rasterize_shape(obj.class_index, obj.center, obj.radius, obj.rotation, 48)
            assert inside[first.label == obj.class_index + 1].all() or obj.class_index in {
                o.class_index for o in first.objects if o is not obj
            }


def test_styles_render_differently_and_the_shifted_style_shares_no_range_with_training():
    from digseg_diffusers.data.synthetic import STYLES

    varied, shifted = STYLES["varied"], STYLES["shifted"]
    assert not set(varied.textures) & set(shifted.textures)
    assert varied.blur_sigma[1] < shifted.blur_sigma[0]
    assert shifted.jpeg_quality[1] < varied.jpeg_quality[0]
    assert varied.noise_std[1] <= shifted.noise_std[0]
    assert varied.outline_width[1] <= shifted.outline_width[0]
    images = {name: np.stack([generate_scene(seed, size=48, style=name).image for seed in range(12)]) for name in STYLES}
    assert not np.array_equal(images["varied"], images["plain"])
    assert not np.array_equal(images["shifted"], images["varied"])
    with pytest.raises(ValueError, match="style"):
        generate_scene(0, style="watercolour")


def test_write_dataset_records_the_style(tmp_path):
    split_dir = write_dataset(tmp_path, "val", num_images=2, size=32, style="shifted")
    assert json.loads((split_dir / "synthetic.json").read_text())["style"] == "shifted"
    image = np.asarray(Image.open(split_dir / "images" / "scene_10000001.png"))
    np.testing.assert_array_equal(image, generate_scene(10_000_001, size=32, style="shifted").image)


def test_split_scene_tensors_are_the_split_scenes_in_vae_pixel_space():
    import torch

    from digseg_diffusers.data.synthetic import SEEDS_PER_SPLIT, split_scene_tensors

    scenes, images, labels = split_scene_tensors("val", 3, 32, first=2)
    expected = [generate_scene(SPLIT_SEED_OFFSETS["val"] + 2 + i, size=32) for i in range(3)]
    assert [s.label.tolist() for s in scenes] == [s.label.tolist() for s in expected]
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (3, 32, 32) and labels.dtype == torch.int64
    assert torch.equal(images[1], torch.from_numpy(expected[1].image).permute(2, 0, 1).float() / 127.5 - 1.0)
    assert torch.equal(labels[2], torch.from_numpy(expected[2].label).long())
    assert images.min() >= -1.0 and images.max() <= 1.0
    with pytest.raises(ValueError, match="owns seeds"):  # held-out seeds stay inside their block
        split_scene_tensors("train", 2, 32, first=SEEDS_PER_SPLIT - 1)
