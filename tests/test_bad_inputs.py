"""A corpus of odd and bad inputs for the pipeline, the CLI, the dataset readers and the ComfyUI logic.

Every input either gives a correct result (checked against a plain equivalent) or a clear error that names the
input; never a bare traceback from deep inside torch, and never a pickle load.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.inference import cli
from digseg_diffusers.data.readers import read_image as read_dataset_image
from digseg_diffusers.image_processing import open_image, to_uint8_rgb
from digseg_diffusers.testing_utils import (
    assert_close_across_paths,
    assert_label_maps_match_across_paths,
    make_tiny_pipeline,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from comfy_nodes import logic  # noqa: E402

PROMPTS = ["circle", "star"]


def grey8(seed=0, size=(24, 32)):
    return np.random.RandomState(seed).randint(0, 256, size, dtype=np.uint8)


def rgb8(seed=0, size=(24, 32)):
    return np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)


def segment(pipe, image, prompt=PROMPTS, **kwargs):
    kwargs.setdefault("processing_resolution", 32)
    return pipe(image, prompt, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


def assert_same_segmentation(out, reference, pipe):
    """Same probabilities up to float32 rounding (the input went through another conversion path)."""
    assert_close_across_paths(out.probabilities[0], reference.probabilities[0], what="probabilities")
    assert_label_maps_match_across_paths(
        out.label_maps[0], reference.label_maps[0], reference.probabilities[0], pipe.config.default_mask_threshold
    )


# ------------------------------------------------------------------------------------------ image kinds: correct


def test_sixteen_bit_image_gives_the_masks_of_its_eight_bit_version(tiny_pipe, tmp_path):
    grey = grey8()
    eight = segment(tiny_pipe, Image.fromarray(grey))
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    assert_same_segmentation(segment(tiny_pipe, sixteen), eight, tiny_pipe)
    # The same through a 16-bit PNG file read by the one loader (PIL may reopen it as 32-bit "I").
    sixteen.save(tmp_path / "grey16.png")
    with open_image(tmp_path / "grey16.png") as reopened:
        assert_same_segmentation(segment(tiny_pipe, reopened), eight, tiny_pipe)


@pytest.mark.parametrize("mode", ["RGBA", "P", "RGBX"])
def test_colour_modes_segment_like_their_rgb_conversion(tiny_pipe, mode):
    image = Image.fromarray(rgb8()).convert(mode)
    reference = segment(tiny_pipe, image.convert("RGB"))
    out = segment(tiny_pipe, image)
    torch.testing.assert_close(out.probabilities[0], reference.probabilities[0], rtol=0, atol=0)  # same pixels


@pytest.mark.parametrize("mode", ["LA", "1", "I"])
def test_grey_modes_segment_like_their_grey_version(tiny_pipe, mode):
    grey = grey8() if mode != "1" else (grey8() > 127).astype(np.uint8) * 255
    image = Image.fromarray(grey).convert(mode) if mode != "I" else Image.fromarray(grey.astype(np.int32) * 257)
    assert_same_segmentation(segment(tiny_pipe, image), segment(tiny_pipe, Image.fromarray(grey)), tiny_pipe)


def test_cmyk_image_is_converted_not_refused(tiny_pipe):
    out = segment(tiny_pipe, Image.fromarray(rgb8()).convert("CMYK"))
    assert out.probabilities[0].shape == (2, 24, 32) and torch.isfinite(out.probabilities[0]).all()


def test_float_tiff_in_unit_range_works_and_out_of_range_is_named(tiny_pipe, tmp_path):
    grey = grey8()
    Image.fromarray(grey.astype(np.float32) / 255.0).save(tmp_path / "float.tif")
    with open_image(tmp_path / "float.tif") as image:
        assert image.mode == "F"
        assert_same_segmentation(segment(tiny_pipe, image), segment(tiny_pipe, Image.fromarray(grey)), tiny_pipe)
    with pytest.raises(ValueError, match=r"image\[0\].*\[0, 1\]"):
        segment(tiny_pipe, Image.fromarray(grey.astype(np.float32)))  # 0..255 floats


def test_integer_images_are_read_by_dtype_and_wider_ones_refused(tiny_pipe):
    """uint8 is value / 255 and uint16 value / 65535, numpy or torch; a uint32 array of 0..255 used to read as
    almost black (value / 4294967295, diffusers' rule) and gave other masks than the same picture as uint8."""
    rgb = rgb8()
    eight = segment(tiny_pipe, rgb)
    sixteen = rgb.astype(np.uint16) * 257
    assert_same_segmentation(segment(tiny_pipe, sixteen), eight, tiny_pipe)
    assert_same_segmentation(segment(tiny_pipe, torch.from_numpy(sixteen).permute(2, 0, 1).to(torch.uint16)), eight,
                             tiny_pipe)  # fmt: skip
    assert_same_segmentation(segment(tiny_pipe, torch.from_numpy(rgb).permute(2, 0, 1)), eight, tiny_pipe)
    with pytest.raises(ValueError, match=r"`image\[0\]`: integer pixels are read as uint8 .* or uint16 .*got uint32"):
        segment(tiny_pipe, rgb.astype(np.uint32))


@pytest.mark.parametrize("size", [(1, 1), (3, 4097), (4097, 3), (2, 700)])
def test_tiny_and_extreme_aspect_images_are_padded_and_processed(tiny_pipe, size):
    image = np.random.RandomState(0).randint(0, 256, (*size, 3), dtype=np.uint8)
    out = segment(tiny_pipe, image, processing_resolution=64)
    assert out.probabilities[0].shape == (2, *size) and out.label_maps[0].shape == size
    assert torch.isfinite(out.probabilities[0]).all()


# ------------------------------------------------------------------------------------------ bad values: named


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.full((3, 8, 8), float("nan")), r"image\[0\].*\[0, 1\]"),
        (torch.full((3, 8, 8), float("inf")), r"image\[0\].*\[0, 1\]"),
        (np.full((8, 8, 3), -np.inf, dtype=np.float32), r"image\[0\].*\[0, 1\]"),
        (np.zeros((8, 8, 3), dtype=np.int32), r"image\[0\].*got signed int32"),
        (np.zeros((8, 8, 3), dtype=np.uint32), r"image\[0\].*uint8 .*uint16 .*got uint32"),
        (np.zeros((8, 8, 3), dtype=np.uint64), r"image\[0\].*uint8 .*uint16 .*got uint64"),
        (torch.zeros((3, 8, 8), dtype=torch.int64), r"image\[0\].*uint8 .*uint16 .*got signed int64"),
        (torch.zeros((3, 8, 8), dtype=torch.uint32), r"image\[0\].*uint8 .*uint16 .*got uint32"),
        (np.zeros((8, 8, 5), dtype=np.uint8), r"image\[0\]"),
        (np.zeros((0, 8, 8, 3), dtype=np.uint8), r"image\[0\].*empty"),
        (np.zeros((8, 0, 3), dtype=np.uint8), r"image\[0\].*empty"),
        ("scene.png", r"image\[0\].*unsupported type"),
        ([], "empty list"),
    ],
)
def test_bad_image_values_are_named(tiny_pipe, image, message):
    with pytest.raises(ValueError, match=message):
        segment(tiny_pipe, image)


@pytest.mark.parametrize("prompt", ["", "   ", ["cat", " \n"], [None], 5, [[]]])
def test_empty_or_wrong_prompts_are_named(tiny_pipe, prompt):
    with pytest.raises(ValueError, match="prompt"):
        segment(tiny_pipe, rgb8(), prompt=prompt)


@pytest.mark.parametrize("prompt", ["star " * 1000, "x" * 10_000])
def test_very_long_prompts_are_truncated_like_the_text_encoder_does(tiny_pipe, prompt):
    out = segment(tiny_pipe, rgb8(), prompt=[prompt, "circle"])
    ids = tiny_pipe.tokenizer(prompt, truncation=True, max_length=tiny_pipe.tokenizer.model_max_length).input_ids
    truncated = tiny_pipe.tokenizer.decode(ids, skip_special_tokens=True)
    assert truncated and len(truncated) < len(prompt)
    assert out.probabilities[0].shape == (2, 24, 32) and torch.isfinite(out.probabilities[0]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(generator=5), "generator"),
        (dict(generator=[torch.Generator()] * 3), "generator"),
        (dict(generator=[5, 6]), "generator"),
        (dict(latents=torch.zeros(2, 4, 2, 2)), "latents"),
        (dict(latents=np.zeros((2, 4, 4, 4))), "latents"),
        (dict(latents=torch.full((2, 4, 4, 4), float("nan"))), "latents"),
    ],
)
def test_wrong_generator_or_latents_are_named(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(rgb8(size=(32, 32)), PROMPTS, processing_resolution=32, **kwargs)


# ------------------------------------------------------------------------------------------ image files


@pytest.fixture
def bad_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(rgb8()).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image at all")
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("missing.png", "image not found"), ("empty.png", "empty"), ("truncated.png", "cannot read image"),
    ("text.png", "cannot read image"),
])  # fmt: skip
def test_unreadable_files_are_named_by_every_loader(bad_files, name, message):
    path = bad_files / name
    for load in (open_image, read_dataset_image):
        with pytest.raises(ValueError, match=message) as info:
            load(path)
        assert name in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_lazily_opened_broken_files_are_named_by_the_pipeline(tiny_pipe, bad_files, damage):
    """`Image.open` reads only the header; the pixels are decoded inside the call, where PIL's OSError used to
    escape as a bare traceback."""
    path = bad_files / f"{damage}-lazy.png"
    data = bytearray((bad_files / "good.png").read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[100:140] = bytes(40)  # inside the pixel data: "broken data stream"
    path.write_bytes(bytes(data))
    with Image.open(path) as image:  # opens: the header is intact
        with pytest.raises(ValueError, match=rf"`image\[1\]`: cannot read image .*{path.name}.*truncated or corrupt"):
            segment(tiny_pipe, [Image.fromarray(rgb8()), image])


def test_decompression_bomb_is_a_named_error(bad_files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 24 x 32 test image is then "huge"
    with pytest.raises(ValueError, match="good.png"):
        open_image(bad_files / "good.png")


def test_dataset_reader_rescales_sixteen_bit_images(tmp_path):
    rgb = rgb8()
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey8.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    eight, sixteen = read_dataset_image(tmp_path / "grey8.png"), read_dataset_image(tmp_path / "grey16.png")
    assert sixteen.dtype == np.uint8 and sixteen.shape == (24, 32, 3)
    np.testing.assert_array_equal(sixteen, eight)
    assert sixteen.max() > 1  # PIL's own convert("RGB") clips 16-bit values to 0 / 255
    np.testing.assert_array_equal(to_uint8_rgb(Image.fromarray(rgb).convert("RGBA")), rgb)


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_tiny_pipeline(seed=0, default_processing_resolution=32).save_pretrained(path)
    return path


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("name", ["empty.png", "truncated.png", "text.png"])
def test_cli_refuses_unreadable_files_in_one_line(bad_files, model_dir, capsys, name):
    code, err = run_cli(["segment", str(bad_files / name), "-p", "a", "--model", str(model_dir), "-o", str(bad_files / "o"), "--quiet"], capsys)
    assert code == 2 and name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_sixteen_bit_png_gives_the_masks_of_its_eight_bit_version(tmp_path, model_dir, capsys):
    grey = grey8(size=(32, 32))
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    results = {}
    for name in ("eight", "sixteen"):
        out = tmp_path / f"out_{name}"
        argv = ["segment", str(tmp_path / f"{name}.png"), "-p", "circle", "-p", "star", "--model", str(model_dir),
                "-o", str(out), "--seed", "0", "--threshold", "0.5", "--quiet"]  # fmt: skip
        code, err = run_cli(argv, capsys)
        assert code == 0, err
        files = (f"{name}.masks/mask_00_circle.png", f"{name}.masks/mask_01_star.png", f"{name}.png")
        results[name] = [np.asarray(Image.open(out / f)) for f in files]
        summary = json.loads((out / f"{name}.json").read_text())
        assert (summary["height"], summary["width"]) == (32, 32)
    for eight, sixteen in zip(results["eight"], results["sixteen"]):
        # Probabilities agree to float32 rounding; a pixel may flip only at the threshold itself.
        assert (eight != sixteen).mean() <= 1 / (32 * 32)


def test_cli_extreme_aspect_image(tmp_path, model_dir, capsys):
    Image.fromarray(rgb8(size=(3, 600))).save(tmp_path / "strip.png")
    code, err = run_cli(["segment", str(tmp_path / "strip.png"), "-p", "a", "--model", str(model_dir), "-o", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "o" / "strip.png")).shape == (3, 600)


# ------------------------------------------------------------------------------------------ model folders


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved")
    make_tiny_pipeline(seed=0).save_pretrained(path)
    return path


def _copy(saved_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(saved_model, target)
    return target


def _bin_only(folder):
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "diffusion_pytorch_model.safetensors"),
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10), "unet"),
        (lambda f: (f / "vae" / "config.json").write_text("{not json"), "config.json"),
        (lambda f: (f / "model_index.json").unlink(), "model_index.json"),
        (lambda f: [p.unlink() for p in (f / "tokenizer").iterdir()], "tokenizer"),
        (_bin_only, r"unet/ hold\(s\) only pickled `.bin` weights.*use_safetensors=None"),
    ],
    ids=["missing-weights", "corrupt-weights", "corrupt-config", "no-model-index", "no-tokenizer-files", "bin-only"],
)
def test_damaged_model_folders_are_named_and_never_unpickled(saved_model, tmp_path, monkeypatch, damage, message):
    folder = _copy(saved_model, tmp_path)
    damage(folder)

    def no_pickles(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises((OSError, ValueError), match=message):
        DiGSegPipeline.from_pretrained(folder)


def test_the_refusal_of_pickled_weights_names_the_way_to_load_a_trusted_folder(saved_model, tmp_path):
    folder = _copy(saved_model, tmp_path)
    _bin_only(folder)
    with pytest.raises(OSError, match="use_safetensors=None"):
        DiGSegPipeline.from_pretrained(folder)
    pipe = DiGSegPipeline.from_pretrained(folder, use_safetensors=None)  # the way the message names
    assert pipe.unet.conv_in.weight.shape[1] == 2 * pipe.vae.config.latent_channels


def _text_projection_of_another_model(folder, extra_in=0, extra_out=0):
    from digseg_diffusers.text_projection import DiGSegTextProjection

    config = json.loads((folder / "text_projection" / "config.json").read_text())
    shutil.rmtree(folder / "text_projection")
    projection = DiGSegTextProjection(config["in_features"] + extra_in, config["out_features"] + extra_out)
    projection.save_pretrained(folder / "text_projection")
    return config["in_features"], config["out_features"]


@pytest.mark.parametrize("extra_in, extra_out", [(8, 0), (0, 8)], ids=["text-width", "cross-attention-width"])
def test_text_projection_of_another_model_is_refused_at_load_naming_the_widths(saved_model, tmp_path, extra_in,
                                                                               extra_out):  # fmt: skip
    """It loaded, then failed at the first call inside LayerNorm ("normalized_shape") or cross-attention ("mat1 and
    mat2 shapes cannot be multiplied")."""
    folder = _copy(saved_model, tmp_path)
    text_width, attention_width = _text_projection_of_another_model(folder, extra_in, extra_out)
    expected = (rf"{folder}: the text_projection maps {text_width + extra_in} -> {attention_width + extra_out} features, "
                rf"but this pipeline needs {text_width} \(text_encoder hidden_size\) -> {attention_width} \(unet")  # fmt: skip
    with pytest.raises(ValueError, match=expected):
        DiGSegPipeline.from_pretrained(folder)


def test_text_projection_refuses_text_states_of_another_width(tiny_pipe):
    projection = tiny_pipe.text_projection
    width = projection.config.in_features
    with pytest.raises(ValueError, match=f"text_projection takes {width}-wide text states; got {width + 8}"):
        projection(torch.zeros(1, 3, width + 8))
    assert projection(torch.zeros(1, 3, width)).shape == (1, 3, projection.config.out_features)


def test_cli_damaged_model_is_one_line(saved_model, tmp_path, capsys):
    folder = _copy(saved_model, tmp_path)
    _bin_only(folder)
    Image.fromarray(rgb8()).save(tmp_path / "ok.png")
    code, err = run_cli(["segment", str(tmp_path / "ok.png"), "-p", "a", "--model", str(folder), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot load the model" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ the ComfyUI logic


def test_comfy_segment_handles_odd_image_batches(tiny_pipe):
    strip = torch.rand(1, 3, 300, 3, generator=torch.Generator().manual_seed(0))  # [B, H, W, C]
    result = logic.segment(tiny_pipe, strip, ["a", "b"], processing_resolution=32, seed=0)
    assert result.masks.shape == (1, 2, 3, 300) and result.label_maps.shape == (1, 3, 300)
    wild = torch.full((1, 16, 16, 3), float("nan"))
    result = logic.segment(tiny_pipe, wild, ["a"], processing_resolution=16, seed=0)  # NaN pixels become 0
    assert torch.isfinite(result.probabilities).all()
    with pytest.raises(ValueError, match="IMAGE"):
        logic.segment(tiny_pipe, torch.rand(16, 16), ["a"])


# ------------------------------------------------------------------------------------------ adapter files


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter

    pipe = make_tiny_pipeline(seed=0)
    apply_adapter(pipe.unet, pipe.text_projection, DiGSegAdapterConfig(rank=4, alpha=16))
    folder = tmp_path_factory.mktemp("adapter")
    return Path(pipe.save_digseg_adapter(folder))


@pytest.mark.parametrize("keep", [5, 100, 0.5, -3], ids=["in-length", "in-header", "in-tensors", "last-bytes"])
@pytest.mark.parametrize("loader", ["load_digseg_adapter", "load_lora_weights"])
def test_truncated_adapter_file_is_named(saved_adapter, tmp_path, keep, loader):
    """safetensors' SafetensorError ("Error while deserializing header") used to escape without the file's name."""
    folder = tmp_path / "adapter"
    shutil.copytree(saved_adapter.parent, folder)
    weights = folder / saved_adapter.name
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match=f"DiGSeg adapter .*{saved_adapter.name} is truncated or corrupt") as error:
        getattr(make_tiny_pipeline(seed=0), loader)(folder)
    assert str(weights) in str(error.value) and "\n" not in str(error.value)
