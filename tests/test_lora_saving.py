"""Saving a pipeline that carries LoRA adapters: never PEFT wrapper keys, and a folder that loads as it ran.

The README's recipe (`load_lora_weights`, `fuse_lora`, `save_pretrained`) used to write the U-Net's PEFT state
(``...base_layer.weight``, ``...lora_A.<name>.weight``): stock diffusers and this package loaded the folder and the
first call failed. diffusers' way to save merged weights (fuse, unload, save) gave the base model.
"""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.adapter import apply_adapter
from digseg_diffusers.testing_utils import assert_close_across_paths, make_tiny_pipeline

from test_lora_loading import CONFIG, _latents, _trained_pipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-saving")
    _trained_pipe(1).save_digseg_adapter(root / "adapter")
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    base = make_tiny_pipeline()
    with_lora = make_tiny_pipeline()
    with_lora.load_lora_weights(root / "adapter", adapter_name="ade")
    return root, image, _latents(base, image), _latents(with_lora, image)


def _peft_keys(folder):
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        return [key for key in handle.keys() if "lora" in key or "base_layer" in key]


def _reloaded_latents(folder, image, stock=False):
    if stock:
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    else:
        pipe = DiGSegPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return _latents(pipe, image)


def _differs(a, b):
    return not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("unload", [False, True], ids=["fused", "fused-then-unloaded"])
def test_a_fused_lora_is_saved_merged_and_loads_with_stock_diffusers(setup, tmp_path, unload):
    root, image, base, lora = setup
    pipe = make_tiny_pipeline()
    pipe.load_lora_weights(root / "adapter", adapter_name="ade")
    pipe.fuse_lora()
    if unload:  # diffusers: unloading after fusing keeps the fused weights
        pipe.unload_lora_weights()
        assert not getattr(pipe.unet, "peft_config", None)
        assert_close_across_paths(_latents(pipe, image), lora, what="latents after fuse + unload")
    pipe.save_pretrained(tmp_path / "merged")
    assert _peft_keys(tmp_path / "merged") == []
    assert not (tmp_path / "merged" / "adapters").exists()
    for stock in (False, True):
        reloaded = _reloaded_latents(tmp_path / "merged", image, stock=stock)
        assert_close_across_paths(reloaded, lora, what="latents of the saved merged pipeline")
        assert _differs(reloaded, base)
    assert_close_across_paths(_latents(pipe, image), lora, what="latents after saving")  # the pipeline is unchanged


def test_an_unfused_lora_saves_the_base_weights_and_the_adapter_beside_them(setup, tmp_path):
    root, image, base, lora = setup
    pipe = make_tiny_pipeline()
    pipe.load_lora_weights(root / "adapter", adapter_name="ade")
    pipe.save_pretrained(tmp_path / "saved")
    assert _peft_keys(tmp_path / "saved") == []
    assert_close_across_paths(_reloaded_latents(tmp_path / "saved", image, stock=True), base, what="base latents")
    reloaded = DiGSegPipeline.from_pretrained(tmp_path / "saved")
    assert_close_across_paths(_latents(reloaded, image), base, what="base latents")
    reloaded.load_lora_weights(tmp_path / "saved" / "adapters" / "ade", adapter_name="ade")
    assert_close_across_paths(_latents(reloaded, image), lora, what="latents with the saved adapter")
    assert_close_across_paths(_latents(pipe, image), lora, what="latents after saving")  # still adapted in memory
    reloaded.unload_lora_weights()  # the saved base is the exact base: conv_in and text projection too
    assert_close_across_paths(_latents(reloaded, image), base, what="base latents after unloading")


def test_a_trainable_lora_is_saved_merged_and_stays_trainable(tmp_path):
    pipe = make_tiny_pipeline()
    parameters = apply_adapter(pipe.unet, pipe.text_projection, CONFIG)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))
    image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
    before = _latents(pipe, image)
    pipe.save_pretrained(tmp_path / "trained")
    assert _peft_keys(tmp_path / "trained") == []
    assert_close_across_paths(_reloaded_latents(tmp_path / "trained", image), before, what="saved trained latents")
    layers = [m for m in pipe.unet.modules() if hasattr(m, "merged_adapters")]
    assert layers and not any(layer.merged_adapters for layer in layers)  # unfused again after saving
    assert all(p.requires_grad for p in parameters)


def test_a_state_dict_loads_like_its_file_with_alpha_equal_to_rank(tmp_path, caplog):
    """diffusers' `load_lora_weights` accepts a dict; it was taken for a Hub id (a confusing OSError)."""
    from safetensors.torch import load_file

    from digseg_diffusers.adapter import DiGSegAdapterConfig, LORA_WEIGHTS_NAME

    config = DiGSegAdapterConfig(rank=4, alpha=4, levels=(2,))  # alpha = rank: what a state dict implies
    _trained_pipe(3, config).save_digseg_adapter(tmp_path / "adapter")
    image = np.random.default_rng(2).random((32, 32, 3)).astype(np.float32)
    from_file = make_tiny_pipeline()
    from_file.load_lora_weights(tmp_path / "adapter")
    from_dict = make_tiny_pipeline()
    with caplog.at_level("WARNING"):
        from_dict.load_lora_weights(load_file(tmp_path / "adapter" / LORA_WEIGHTS_NAME), adapter_name="mine")
    assert "alpha = rank = 4" in caplog.text
    assert from_dict.get_list_adapters() == {"unet": ["mine"]}
    assert_close_across_paths(_latents(from_dict, image), _latents(from_file, image), what="latents")
    with pytest.raises(ValueError, match="no DiGSeg LoRA tensors"):
        make_tiny_pipeline().load_lora_weights({"unet.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not"):
        make_tiny_pipeline().load_lora_weights({"unet.x.lora_A.weight": "not a tensor"})
