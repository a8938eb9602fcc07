"""`DiGSegPipeline.from_base_model`: the U-Net surgery and loading an SD-layout base offline by hub id."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.testing_utils import CROSS_PATH_ATOL, make_tiny_text_encoder, save_tiny_sd_base
from digseg_diffusers.tokenization import build_char_clip_tokenizer
from digseg_diffusers.conversion import widen_conv_in


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    return save_tiny_sd_base(tmp_path_factory.mktemp("sd-base"), prediction_type="epsilon")


def test_widened_conv_in_reproduces_the_original_on_duplicated_input(sd_base):
    unet = UNet2DConditionModel.from_pretrained(sd_base, subfolder="unet")
    original = torch.nn.Conv2d(4, unet.conv_in.out_channels, 3, padding=1)
    original.load_state_dict(unet.conv_in.state_dict())
    widen_conv_in(unet)
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(unet.conv_in(torch.cat([z, z], dim=1)), original(z), atol=CROSS_PATH_ATOL, rtol=1e-5)
    assert widen_conv_in(unet) is unet and unet.conv_in.in_channels == 8  # idempotent on a DiGSeg U-Net


def test_widen_conv_in_rejects_unexpected_channels():
    unet = UNet2DConditionModel(
        in_channels=5, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, cross_attention_dim=8, layers_per_block=1,
    )
    with pytest.raises(ValueError, match="conv_in"):
        widen_conv_in(unet)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_from_base_model_builds_a_working_pipeline(tmp_path, prediction_type):
    base = save_tiny_sd_base(tmp_path / "base", prediction_type=prediction_type)
    pipe = DiGSegPipeline.from_base_model(base)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 8
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.text_projection.config.out_features == pipe.unet.config.cross_attention_dim
    assert pipe.config.base_model == base
    out = pipe(np.zeros((32, 32, 3), np.uint8), ["road"], processing_resolution=0, generator=torch.Generator())
    assert np.isfinite(out.probabilities[0]).all()


def test_from_base_model_with_a_separate_text_encoder(sd_base):
    """The paper pairs SD2 (1024-wide cross-attention) with CLIP ViT-L/14 (768-wide): widths differ."""
    text_encoder = make_tiny_text_encoder(hidden_size=24)
    pipe = DiGSegPipeline.from_base_model(sd_base, text_encoder=text_encoder, tokenizer=build_char_clip_tokenizer())
    assert pipe.text_projection.config.in_features == 24
    assert pipe.text_projection.config.out_features == 32
    with pytest.raises(ValueError, match="tokenizer"):
        DiGSegPipeline.from_base_model(sd_base, text_encoder=text_encoder)


def _write_hub_cache(cache: str, repo_id: str, folder: str) -> None:
    """Lay `folder` out the way huggingface_hub caches a downloaded model repo."""
    org, name = repo_id.split("/")
    repo_dir = os.path.join(cache, f"models--{org}--{name}")
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, os.path.join(repo_dir, "snapshots", commit))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)


@pytest.mark.slow
def test_from_base_model_by_hub_id_offline(sd_base, tmp_path):
    cache = str(tmp_path / "hub")
    _write_hub_cache(cache, "tiny-org/tiny-sd2", sd_base)
    script = (
        "import json\n"
        "from digseg_diffusers import DiGSegPipeline\n"
        "pipe = DiGSegPipeline.from_base_model('tiny-org/tiny-sd2')\n"
        "print(json.dumps({'in_channels': pipe.unet.config.in_channels, 'base': pipe.config.base_model}))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=cache, HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"in_channels": 8, "base": "tiny-org/tiny-sd2"}
