import importlib.util
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from digseg_diffusers.testing_utils import make_tiny_vae
from digseg_diffusers.evaluation.vae_study import (
    format_markdown_table,
    generate_random_masks,
    masks_from_label_maps,
    vae_mask_roundtrip,
)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "training", "vae_mask_study.py")
FIELDS = (
    "mae_mean", "mae_std", "mae_pixel_space_mean", "mae_pixel_space_std", "channel_std_mean", "channel_std_std",
    "channel_max_min_mean", "channel_max_min_std", "channel_max_min_worst", "iou", "mean_mask_iou",
)  # fmt: skip


class IdentityCodec:
    """A perfect 'VAE': the latent is the image itself (AutoencoderTiny-style outputs)."""

    def __init__(self, distort: float = 0.0):
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.distort = distort

    def encode(self, pixels):
        return SimpleNamespace(latents=pixels.clone())

    def decode(self, latents, return_dict=False):
        out = latents.clone()
        out[:, 0] += self.distort  # only the red channel drifts
        return (out,)


def run_script(argv):
    spec = importlib.util.spec_from_file_location("vae_mask_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def check_report(report, num_masks, resolution):
    assert report["num_masks"] == num_masks and report["resolution"] == [resolution, resolution]
    for field in FIELDS:
        assert math.isfinite(report[field]), field
        assert report[field] >= 0, field
    assert report["mae_mean"] <= 1
    assert 0 <= report["iou"] <= 1 and 0 <= report["mean_mask_iou"] <= 1
    assert report["channel_max_min_worst"] >= report["channel_max_min_mean"]


def test_random_masks_are_binary_nonempty_and_seeded():
    masks = generate_random_masks(5, 24, 32, seed=3)
    assert masks.shape == (5, 24, 32)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.sum(dim=(1, 2)) > 0).all()
    assert torch.equal(masks, generate_random_masks(5, 24, 32, seed=3))
    assert not torch.equal(masks, generate_random_masks(5, 24, 32, seed=4))


def test_perfect_codec_has_zero_error_and_full_iou():
    masks = generate_random_masks(3, 16, 16)
    report = vae_mask_roundtrip(IdentityCodec(), masks, batch_size=2)
    assert report["mae_mean"] == 0 and report["mae_pixel_space_mean"] == 0
    assert report["channel_std_mean"] == 0 and report["channel_max_min_mean"] == 0
    assert report["iou"] == 1 and report["mean_mask_iou"] == 1


def test_channel_spread_is_measured():
    # red channel shifted by 0.3 in [-1, 1] space: max - min = 0.3, population std = 0.3 * sqrt(2) / 3
    report = vae_mask_roundtrip(IdentityCodec(distort=0.3), torch.zeros(2, 8, 8), batch_size=1)
    assert report["channel_max_min_mean"] == pytest.approx(0.3, abs=1e-6)
    assert report["channel_std_mean"] == pytest.approx(0.3 * math.sqrt(2) / 3, abs=1e-6)
    # mean over channels shifts by 0.1 -> probability by 0.05
    assert report["mae_mean"] == pytest.approx(0.05, abs=1e-6)
    assert report["mae_pixel_space_mean"] == pytest.approx(0.1, abs=1e-6)
    assert math.isnan(report["iou"])  # empty masks, nothing predicted: IoU undefined


def test_tiny_random_vae_report_fields_and_ranges():
    masks = generate_random_masks(3, 32, 32)
    report = vae_mask_roundtrip(make_tiny_vae(), masks, batch_size=2)
    check_report(report, 3, 32)
    assert report["mae_mean"] > 0  # an untrained VAE is far from perfect
    table = format_markdown_table([("tiny", report)])
    assert table.count("\n") == 2 and "| tiny | 3 | 32x32 |" in table


def test_masks_from_label_maps_skip_ignored_labels():
    label_maps = [np.full((10, 20), 255, dtype=np.uint8), np.array([[0, 0, 7, 7]] * 4, dtype=np.uint8)]
    masks = masks_from_label_maps(label_maps, num_masks=5, resolution=4, ignore_labels=(255, 0), seed=0)
    assert masks.shape == (1, 4, 4)
    assert masks[0].tolist() == [[0, 0, 1, 1]] * 4
    with pytest.raises(ValueError, match="no usable mask"):
        masks_from_label_maps(label_maps[:1], num_masks=1, resolution=4)


def test_script_with_a_saved_vae_and_a_label_folder(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path / "model" / "vae")
    data = tmp_path / "labels"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        label = rng.integers(0, 4, size=(40, 48)).astype(np.uint8)
        label[:10] = 255
        Image.fromarray(label).save(data / f"{i}.png")
    output = tmp_path / "report.json"
    report = run_script([
        "--pretrained_model_name_or_path", str(tmp_path / "model"), "--subfolder", "vae", "--data_dir", str(data),
        "--num_masks", "2", "--resolution", "32", "--output", str(output), "--device", "cpu",
    ])  # fmt: skip
    check_report(report, 2, 32)
    saved = json.loads(output.read_text())
    assert saved["vae_class"] == "AutoencoderKL" and saved["data"] == str(data)
    assert saved["mae_mean"] == pytest.approx(report["mae_mean"])


def test_script_reads_masks_through_the_project_readers(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((36, 36, 3), dtype=np.uint8)).save(root / "images" / "validation" / f"{i}.jpg")
        label = np.zeros((36, 36), dtype=np.uint8)  # 0 = "other", ignored by the ADE20K reader
        label[4:20, 4:30] = 7 + i
        Image.fromarray(label).save(root / "annotations" / "validation" / f"{i}.png")
    report = run_script([
        "--pretrained_model_name_or_path", str(tmp_path / "vae"), "--data_dir", str(tmp_path),
        "--dataset_format", "ade20k", "--split", "validation", "--num_masks", "5", "--resolution", "32",
    ])  # fmt: skip
    check_report(report, 2, 32)  # one mask per label map; the ignored id 0 is never drawn as a class


def test_script_with_autoencoder_tiny_and_random_shapes(tmp_path, capsys):
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    ).save_pretrained(tmp_path / "taesd")  # fmt: skip
    report = run_script(["--pretrained_model_name_or_path", str(tmp_path / "taesd"), "--num_masks", "2",
                         "--resolution", "32", "--device", "cpu"])  # fmt: skip
    check_report(report, 2, 32)
    assert report["vae_class"] == "AutoencoderTiny" and report["data"] == "random shapes"
    assert "| channel std |" in capsys.readouterr().out
