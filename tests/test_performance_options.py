"""Speed/memory options must not change what the pipeline computes beyond their stated tolerance.

Each test builds its own tiny pipeline (the options mutate weights or module state), runs it with and without
the option on the same noise, and compares the probability maps.
"""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter, is_adapter_fused
from digseg_diffusers.testing_utils import CROSS_PATH_ATOL, make_tiny_pipeline

PROMPTS = ["circle", "star"]
FLOAT32_ATOL = CROSS_PATH_ATOL  # another kernel order (memory format, slices, merged weights): float32 rounding only
BF16_ATOL = 0.05  # bfloat16 keeps 8 mantissa bits; measured max difference on the tiny pipeline: ~0.02


def probabilities(pipe, image, **kwargs) -> np.ndarray:
    kwargs.setdefault("processing_resolution", 0)
    return pipe(image, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).probabilities[0]


@pytest.fixture
def pipe():
    return make_tiny_pipeline(seed=0)


def test_attention_uses_pytorch_sdpa(pipe):
    # diffusers' default processor calls F.scaled_dot_product_attention (fused kernels where available).
    for model in (pipe.unet, pipe.vae):
        processors = model.attn_processors
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_channels_last_gives_the_same_masks(pipe, rgb_image):
    reference = probabilities(pipe, rgb_image)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(probabilities(pipe, rgb_image), reference, atol=FLOAT32_ATOL)


def test_bfloat16_is_close_to_float32(pipe, rgb_image):
    reference = probabilities(pipe, rgb_image)
    pipe.to(torch.bfloat16)
    out = probabilities(pipe, rgb_image)
    assert out.dtype == np.float32  # outputs stay float32 whatever the compute dtype
    np.testing.assert_allclose(out, reference, atol=BF16_ATOL)
    assert np.abs(out - reference).max() > 0  # it really ran in bfloat16


def test_vae_slicing_gives_the_same_masks(pipe, rgb_image):
    reference = probabilities(pipe, rgb_image)
    pipe.vae.enable_slicing()
    np.testing.assert_allclose(probabilities(pipe, rgb_image), reference, atol=FLOAT32_ATOL)


def test_vae_tiling_runs_through_the_pipeline_on_a_large_image(pipe):
    # The tiny VAE tiles above 64 px: a 96 px image is encoded and decoded in overlapping, blended tiles.
    image = np.random.RandomState(1).randint(0, 256, (96, 96, 3), dtype=np.uint8)
    reference = probabilities(pipe, image)
    calls = []
    for name in ("_tiled_encode", "tiled_decode"):
        original = getattr(pipe.vae, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(pipe.vae, name, spy)
    pipe.vae.enable_tiling()
    tiled = probabilities(pipe, image)
    assert "_tiled_encode" in calls and "tiled_decode" in calls
    assert tiled.shape == reference.shape == (2, 96, 96)
    assert np.isfinite(tiled).all() and tiled.min() >= 0.0 and tiled.max() <= 1.0
    # Tiles see their own GroupNorm statistics, so tiling is an approximation, not a reordering; on this
    # random VAE the mean difference is ~0.04.
    assert np.abs(tiled - reference).mean() < 0.1


def test_fused_lora_adapter_gives_the_same_masks(pipe, rgb_image):
    apply_adapter(pipe.unet, pipe.text_projection, DiGSegAdapterConfig(mode="lora", rank=4))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give it weights so fusing changes the kernels
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    pipe.unet.eval()
    unfused = probabilities(pipe, rgb_image)
    pipe.fuse_lora()
    assert is_adapter_fused(pipe.unet)
    fused = probabilities(pipe, rgb_image)
    np.testing.assert_allclose(fused, unfused, atol=FLOAT32_ATOL)
    pipe.unfuse_lora()
    np.testing.assert_allclose(probabilities(pipe, rgb_image), unfused, atol=FLOAT32_ATOL)


def test_model_cpu_offload_sequence_covers_every_model_component(pipe):
    # enable_model_cpu_offload needs an accelerator (on CPU diffusers raises); what this package controls is
    # that the offload order names every model component, the optional light decoder included.
    sequence = pipe.model_cpu_offload_seq.split("->")
    models = [name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)]
    assert set(models) <= set(sequence)
    assert "mask_decoder" in sequence
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()
