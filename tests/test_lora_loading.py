"""DiGSeg adapters as diffusers/PEFT LoRA files, and the pipeline's diffusers-style LoRA methods."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from digseg_diffusers.adapter import (
    DIGSEG_METADATA_KEY,
    LORA_WEIGHTS_NAME,
    DiGSegAdapterConfig,
    adapter_state_dict,
    apply_adapter,
    architecture_fingerprint,
    load_adapter,
    read_adapter,
    select_adapter_modules,
)
from digseg_diffusers.testing_utils import assert_close_across_paths, make_tiny_pipeline, make_tiny_unet

CONFIG = DiGSegAdapterConfig(rank=4, alpha=16, levels=(2,), base_model="tiny/sd2")


def _trained_pipe(seed, config=CONFIG):
    """A tiny pipeline with an adapter applied and its trainable weights moved away from their start."""
    pipe = make_tiny_pipeline()
    parameters = apply_adapter(pipe.unet, pipe.text_projection, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))
    return pipe


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    pipes = {}
    for name, seed in (("a", 1), ("b", 2)):
        pipes[name] = _trained_pipe(seed)
        pipes[name].save_digseg_adapter(root / name)  # no `config=`: the applied one must be written
    return root, pipes


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)


def _latents(pipe, image):
    out = pipe(image, prompt=["circle", "star"], processing_resolution=32, output_latent=True,
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return out.latents


def _assert_same_latents(actual, expected):
    """Pipelines that should agree run through different modules (PEFT wrappers, disabled adapters), and the CPU's
    kernels may then round differently (a 1e-6 relative change of every U-Net weight moves these latents by 3.5e-6)."""
    assert_close_across_paths(actual, expected, what="latents")


def _unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    sample, states = torch.randn(1, 8, 8, 8, generator=generator), torch.randn(1, 32, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([999]), encoder_hidden_states=states).sample


def test_saving_without_config_writes_the_applied_config(adapters):
    """The bug: rank 8 / alpha 8 / levels [1, 2] (the defaults) were written for a rank 4 / alpha 16 / (2,) adapter."""
    root, pipes = adapters
    document, _, _ = read_adapter(root / "a")
    assert (document["rank"], document["alpha"], document["levels"]) == (4, 16, [2])
    assert document["target_modules"] == select_adapter_modules(pipes["a"].unet, CONFIG)
    fresh = make_tiny_pipeline()
    assert fresh.load_digseg_adapter(root / "a") == DiGSegAdapterConfig(**{**CONFIG.to_dict(), "levels": (2,)})


def test_the_file_is_a_diffusers_lora_with_alpha_and_conv_in_in_its_metadata(adapters):
    root, pipes = adapters
    path = root / "a" / LORA_WEIGHTS_NAME
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    lora = json.loads(metadata["lora_adapter_metadata"])
    assert lora["unet.r"] == 4 and lora["unet.lora_alpha"] == 16 and lora["unet.modules_to_save"] == ["conv_in"]
    assert sorted(lora["unet.target_modules"]) == sorted(select_adapter_modules(pipes["a"].unet, CONFIG))
    keys = set(load_file(path))
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in keys)  # PEFT key names
    assert {"unet.conv_in.weight", "text_projection.fc1.weight"} <= keys
    assert json.loads(metadata[DIGSEG_METADATA_KEY])["format_version"] == 2


def test_diffusers_and_peft_load_the_unet_part_correctly(adapters):
    """`unet.load_lora_adapter` used to load alpha 8 instead of 16 and drop conv_in (outputs off by 0.38)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    root, pipes = adapters
    expected = _unet_output(pipes["a"].unet)
    assert not torch.allclose(_unet_output(make_tiny_unet().eval()), expected, atol=1e-3)

    unet = make_tiny_unet().eval()
    unet.load_lora_adapter(str(root / "a"), prefix="unet", adapter_name="a", use_safetensors=True)
    assert unet.peft_config["a"].lora_alpha == 16
    torch.testing.assert_close(_unet_output(unet), expected, atol=1e-6, rtol=0)

    path = root / "a" / LORA_WEIGHTS_NAME
    with safe_open(path, framework="pt") as handle:
        packed = json.loads(handle.metadata()["lora_adapter_metadata"])
    config = LoraConfig(**{k.removeprefix("unet."): v for k, v in packed.items() if k.removeprefix("unet.") in LoraConfig.__dataclass_fields__})
    unet = make_tiny_unet().eval()
    inject_adapter_in_model(config, unet, adapter_name="default")
    state = {k.removeprefix("unet."): v for k, v in load_file(path).items() if k.startswith("unet.")}
    set_peft_model_state_dict(unet, state, adapter_name="default")
    torch.testing.assert_close(_unet_output(unet), expected, atol=1e-6, rtol=0)


def test_partial_files_fail_loudly_and_change_nothing(adapters, tmp_path):
    root, _ = adapters
    tensors = load_file(root / "a" / LORA_WEIGHTS_NAME)
    with safe_open(root / "a" / LORA_WEIGHTS_NAME, framework="pt") as handle:
        metadata = handle.metadata()
    (tmp_path / "plain").mkdir()
    save_file(tensors, tmp_path / "plain" / LORA_WEIGHTS_NAME, metadata={"format": "pt"})  # LoRA, no DiGSeg config
    (tmp_path / "no_projection").mkdir()
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_projection.")},
              tmp_path / "no_projection" / LORA_WEIGHTS_NAME, metadata=metadata)  # fmt: skip
    pipe = make_tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.text_projection.state_dict().items()}
    with pytest.raises(ValueError, match="without DiGSeg metadata"):
        pipe.load_lora_weights(tmp_path / "plain")
    with pytest.raises(ValueError, match="text projection: missing"):
        pipe.load_lora_weights(tmp_path / "no_projection")
    assert not getattr(pipe.unet, "peft_config", None)
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_projection.state_dict().items())


@pytest.mark.slow
def test_pipeline_lora_methods(adapters, image):
    root, pipes = adapters
    expected = {name: _latents(p, image) for name, p in pipes.items()}
    pipe = make_tiny_pipeline()
    base = _latents(pipe, image)
    assert not any(torch.allclose(base, e, atol=1e-3) for e in expected.values())  # the tolerance can tell them apart
    base_state = {k: v.clone() for k, v in pipe.unet.conv_in.state_dict().items()}
    pipe.load_lora_weights(root / "a", adapter_name="a")
    _assert_same_latents(_latents(pipe, image), expected["a"])
    pipe.load_lora_weights(root / "b" / LORA_WEIGHTS_NAME, adapter_name="b")  # a file works too
    assert pipe.get_list_adapters() == {"unet": ["a", "b"]} and pipe.get_active_adapters() == ["b"]
    _assert_same_latents(_latents(pipe, image), expected["b"])
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(root / "a", adapter_name="a")

    pipe.set_adapters(["a", "b"], [0.5, 0.5])
    mixed = _latents(pipe, image)
    assert not torch.allclose(mixed, expected["a"], atol=1e-3) and not torch.allclose(mixed, expected["b"], atol=1e-3)
    pipe.disable_lora()
    _assert_same_latents(_latents(pipe, image), base)  # conv_in and the text projection too
    pipe.enable_lora()
    _assert_same_latents(_latents(pipe, image), mixed)

    pipe.set_adapters("a")
    pipe.fuse_lora()
    _assert_same_latents(_latents(pipe, image), expected["a"])  # fused: the merged weights round differently
    pipe.unfuse_lora()
    _assert_same_latents(_latents(pipe, image), expected["a"])
    pipe.fuse_lora(lora_scale=0.5)
    assert not torch.allclose(_latents(pipe, image), expected["a"], atol=1e-4)
    pipe.unfuse_lora()

    pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == {"unet": ["a"]}
    pipe.unload_lora_weights()
    _assert_same_latents(_latents(pipe, image), base)
    assert all(torch.equal(v, base_state[k]) for k, v in pipe.unet.conv_in.state_dict().items())
    assert type(pipe.unet.conv_in).__name__ == "Conv2d" and not getattr(pipe.unet, "peft_config", None)


