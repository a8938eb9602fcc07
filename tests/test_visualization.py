import numpy as np
import pytest
from PIL import Image

from digseg_diffusers.inference.visualization import BASE_COLORS, colorize_label_map, label_colors, overlay


def test_label_colors_background_black_and_distinct():
    colors = label_colors(900)
    assert colors.shape == (901, 3) and colors.dtype == np.uint8
    assert (colors[0] == 0).all()
    assert tuple(colors[1]) == BASE_COLORS[0]
    # Every class is distinguishable from the background, and colours repeat rarely even for A-847.
    assert (colors[1:].sum(axis=1) > 0).all()
    unique = np.unique(colors[1:], axis=0)
    assert len(unique) >= 0.95 * 900
    # Deterministic: the CLI and the ComfyUI nodes get the same colours.
    assert np.array_equal(label_colors(900)[:30], label_colors(29))


def test_label_colors_rejects_bad_count():
    with pytest.raises(ValueError, match="num_classes"):
        label_colors(-1)


def test_colorize_label_map_maps_each_label_to_its_colour():
    labels = np.array([[0, 1], [2, 3]], dtype=np.int64)
    rgb = colorize_label_map(labels, num_classes=3)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    palette = label_colors(3)
    for y in range(2):
        for x in range(2):
            assert tuple(rgb[y, x]) == tuple(palette[labels[y, x]])


def test_colorize_label_map_accepts_pil_and_float_integers():
    labels = np.array([[0, 2], [1, 1]], dtype=np.uint8)
    from_pil = colorize_label_map(Image.fromarray(labels))
    from_float = colorize_label_map(labels.astype(np.float32))
    assert np.array_equal(from_pil, colorize_label_map(labels))
    assert np.array_equal(from_float, from_pil)


def test_colorize_label_map_ignore_index_is_white():
    labels = np.array([[0, 255], [1, 1]], dtype=np.int64)
    rgb = colorize_label_map(labels, num_classes=2)
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert tuple(rgb[1, 0]) == BASE_COLORS[0]


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros((2, 2, 1), dtype=np.int64), "2-D"),
        (np.array([[0.5, 1.0]]), "non-integer"),
        (np.array([[-1, 0]]), "negative"),
        (np.array([[True, False]]), "integer labels"),
    ],
)
def test_colorize_label_map_rejects_bad_maps(labels, message):
    with pytest.raises(ValueError, match=message):
        colorize_label_map(labels)


def test_colorize_label_map_rejects_label_above_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        colorize_label_map(np.array([[0, 3]]), num_classes=2)


def test_overlay_keeps_background_and_blends_foreground():
    image = np.full((2, 3, 3), 100, dtype=np.uint8)
    labels = np.array([[0, 1, 2], [0, 0, 1]])
    out = overlay(image, labels, alpha=0.5)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert (out[labels == 0] == 100).all()
    palette = label_colors(2).astype(np.float32)
    expected = np.round(100 * 0.5 + palette[1] * 0.5)
    assert np.array_equal(out[0, 1], expected.astype(np.uint8))
    # alpha 0 leaves the image untouched; alpha 1 paints the pure label colour.
    assert np.array_equal(overlay(image, labels, alpha=0.0), image)
    assert tuple(overlay(image, labels, alpha=1.0)[0, 2]) == tuple(label_colors(2)[2])


def test_overlay_accepts_grey_rgba_and_pil():
    labels = np.array([[1, 0]])
    grey = np.array([[10, 20]], dtype=np.uint8)
    rgba = np.dstack([np.repeat(grey[:, :, None], 3, axis=2), np.full((1, 2), 7, dtype=np.uint8)])
    out_grey = overlay(grey, labels)
    assert out_grey.shape == (1, 2, 3)
    assert np.array_equal(overlay(rgba, labels), out_grey)
    assert np.array_equal(overlay(Image.fromarray(grey), labels), out_grey)
    # 16-bit and float images are rescaled to 8 bits, never clipped to 0 / 255.
    grey16 = grey.astype(np.uint16) * 257
    assert np.array_equal(overlay(grey16, labels), out_grey)
    assert np.array_equal(overlay(Image.fromarray(grey16), labels), out_grey)
    assert np.array_equal(overlay(grey.astype(np.float32) / 255.0, labels), out_grey)


@pytest.mark.parametrize(
    "image, labels, alpha, message",
    [
        (np.full((2, 2, 3), np.nan, dtype=np.float32), np.zeros((2, 2), dtype=np.int64), 0.5, r"\[0, 1\]"),
        (np.full((2, 2, 3), 1.5, dtype=np.float32), np.zeros((2, 2), dtype=np.int64), 0.5, r"\[0, 1\]"),
        (np.zeros((2, 2, 3), dtype=np.uint8), np.zeros((3, 2), dtype=np.int64), 0.5, "must match"),
        (np.zeros((2, 2, 2), dtype=np.uint8), np.zeros((2, 2), dtype=np.int64), 0.5, "image_uint8"),
        (np.zeros((2, 2, 3), dtype=np.uint8), np.zeros((2, 2), dtype=np.int64), 1.5, "alpha"),
    ],
)
def test_overlay_rejects_bad_inputs(image, labels, alpha, message):
    with pytest.raises(ValueError, match=message):
        overlay(image, labels, alpha=alpha)


def test_legend_names_each_colour_and_wraps():
    from digseg_diffusers.inference.visualization import legend_image, titled_row

    names = ["background", "circle", "square", "star"]
    legend = np.asarray(legend_image(names, width=400))
    colors = label_colors(3)
    for color in colors:  # every class's swatch is drawn in its label colour (background: black)
        assert (legend == color).all(axis=-1).sum() >= 100
    narrow = legend_image([f"class {i}" for i in range(12)], width=120)
    wide = legend_image([f"class {i}" for i in range(12)], width=2000)
    assert narrow.width == 120 and narrow.height > wide.height  # wraps onto more rows
    row = titled_row([np.zeros((10, 20, 3), np.uint8), np.full((10, 30, 3), 255, np.uint8)], ["a", "b"], gap=4)
    assert row.width == 54 and row.height > 10
