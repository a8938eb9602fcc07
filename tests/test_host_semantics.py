"""The pipeline as its hosts run it: grad modes, the embedded demo model, half-precision loading, offloading, and
no network.

ComfyUI loads and runs every node under `torch.inference_mode()`; scripts and servers use `torch.no_grad()` or
nothing (the pipeline's `__call__` is `no_grad` itself); several hosts call one loaded pipeline again and again, so
the second call with the same prompts is served from the prompt cache. Each test states what a host relies on.
"""

import contextlib
import socket

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.data.synthetic import generate_scene
from digseg_diffusers.testing_utils import (
    assert_close_across_paths,
    assert_label_maps_match_across_paths,
    assert_masks_match_across_paths,
    make_tiny_pipeline,
)

PROMPTS = ["circle", "star"]
GRAD_MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}


def image() -> torch.Tensor:
    return torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))


def run(pipe, **kwargs):
    kwargs = {"processing_resolution": 0, "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(kwargs.pop("image", image()), kwargs.pop("prompt", PROMPTS), **kwargs)


def load(folder, **kwargs) -> DiGSegPipeline:
    pipe = DiGSegPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    make_tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference():
    """The tiny pipeline's output, built and called without any grad-mode context."""
    return run(make_tiny_pipeline(seed=0))


def assert_same_segmentation(output, expected, mask_threshold: float = 0.7) -> None:
    """Probabilities, masks and label maps of two code paths agree (within the project's cross-path tolerance)."""
    for index, expected_probabilities in enumerate(expected.probabilities):
        assert_close_across_paths(output.probabilities[index], expected_probabilities, what=f"image {index}")
        assert_masks_match_across_paths(output.masks[index], expected.masks[index], expected_probabilities, mask_threshold)
        assert_label_maps_match_across_paths(
            output.label_maps[index], expected.label_maps[index], expected_probabilities, mask_threshold
        )


# Load in one grad mode, then call twice (the second call is a prompt-cache hit) in the modes listed: ComfyUI
# (all inference mode), a script (no_grad), and a process where both meet (embeddings cached in one mode are
# served in the other).
HOSTS = {
    "comfyui_inference_mode": ("inference_mode", ["inference_mode", "inference_mode"]),
    "script_no_grad": ("no_grad", ["no_grad", "no_grad"]),
    "cached_in_inference_mode_served_outside": ("plain", ["inference_mode", "plain"]),
    "loaded_in_inference_mode_called_outside": ("inference_mode", ["plain", "inference_mode"]),
}


@pytest.mark.parametrize("host", list(HOSTS))
def test_loaded_and_called_in_the_hosts_grad_modes(host, tiny_folder, reference):
    load_mode, call_modes = HOSTS[host]
    with GRAD_MODES[load_mode]():
        pipe = load(tiny_folder)
    outputs, cache = [], []
    for mode in call_modes:
        with GRAD_MODES[mode]():
            outputs.append(run(pipe))
        cache.append(pipe.prompt_cache_info())
    assert cache[0]["misses"] == len(PROMPTS) and cache[0]["hits"] == 0
    assert cache[1]["misses"] == len(PROMPTS) and cache[1]["hits"] == len(PROMPTS)  # served from the cache
    np.testing.assert_array_equal(outputs[1].probabilities[0], outputs[0].probabilities[0])
    assert_same_segmentation(outputs[0], reference)


def test_the_embedded_demo_model_under_inference_mode():
    """`from_pretrained("digseg-demo")` and two calls inside inference mode give the maps of a plain load and call,
    and the demo model finds the scene's shapes (well above chance on this scene)."""
    scene = generate_scene(20_000_000)
    with torch.inference_mode():
        pipe = load("digseg-demo")
        first = run(pipe, image=scene.image, prompt=["circle", "star"], output_type="pt")
        second = run(pipe, image=scene.image, prompt=["circle", "star"], output_type="pt")
    assert pipe.prompt_cache_info()["hits"] == 2
    assert torch.equal(first.probabilities[0], second.probabilities[0])
    plain = run(load("digseg-demo"), image=scene.image, prompt=["circle", "star"], output_type="pt")
    assert_same_segmentation(first, plain)
    # Tensors made in inference mode are usable outside it (hosts post-process them there).
    foreground = first.probabilities[0].max(dim=0).values > 0.5
    assert foreground.dtype == torch.bool and 0 < int(foreground.sum()) < foreground.numel()


@pytest.mark.parametrize("dtype_argument", ["dtype", "torch_dtype"])
def test_half_precision_loading(dtype_argument, tiny_folder, reference):
    """A saved float32 folder loaded in bfloat16 (diffusers' `dtype`, and the older `torch_dtype` that host scripts
    still pass), inside inference mode as ComfyUI loads: every model component is bfloat16, the outputs stay float32
    maps in [0, 1] close to the float32 ones."""
    with torch.inference_mode():
        pipe = load(tiny_folder, **{dtype_argument: torch.bfloat16})
        output = run(pipe)
    dtypes = {name: c.dtype for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert dtypes == dict.fromkeys(["unet", "vae", "text_encoder", "text_projection"], torch.bfloat16)
    probabilities = output.probabilities[0]
    assert probabilities.dtype == np.float32 and 0.0 <= probabilities.min() and probabilities.max() <= 1.0
    assert np.abs(probabilities - reference.probabilities[0]).max() < 0.1  # half precision, not another result


def sequential_cpu_offload(pipe) -> None:
    """What `enable_sequential_cpu_offload` installs, executing on "cpu" (its own "cpu:0" fails in accelerate)."""
    import accelerate

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            accelerate.cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)


OFFLOADS = {
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
    "sequential_cpu_offload": sequential_cpu_offload,
}


@pytest.mark.parametrize("offload", list(OFFLOADS))
@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_cpu_offload_gives_the_plain_pipelines_output(offload, grad_mode, reference):
    pipe = make_tiny_pipeline(seed=0)
    OFFLOADS[offload](pipe)
    with GRAD_MODES[grad_mode]():
        first, second = run(pipe), run(pipe)
    assert_same_segmentation(first, reference)
    assert_same_segmentation(second, reference)


@pytest.mark.parametrize("offline", [False, True], ids=["online_mode", "HF_HUB_OFFLINE"])
def test_local_and_embedded_models_load_and_run_without_the_network(offline, tiny_folder, reference, monkeypatch):
    """A saved folder and the embedded demo model load and run with no connection attempted, in online mode and
    with HF_HUB_OFFLINE=1: the suite and the hosts do not depend on the caller's Hub settings."""
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network access attempted in a test that must not need it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: refuse(None, *args))

    assert_same_segmentation(run(load(tiny_folder)), reference)
    demo = load("digseg-demo")
    assert run(demo, image=generate_scene(20_000_000).image, prompt="circle").probabilities[0].shape == (1, 64, 64)
    assert attempts == []


@pytest.mark.parametrize("offload", list(OFFLOADS))
@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_prompt_cache_serves_repeated_calls_under_cpu_offload(offload, grad_mode):
    """Offloading is where skipping the text encoder saves most; built in the grad mode it runs in, as hosts do."""
    with GRAD_MODES[grad_mode]():
        pipe = make_tiny_pipeline(seed=0)
        OFFLOADS[offload](pipe)
        run(pipe)
        run(pipe)
    assert pipe.prompt_cache_info()["hits"] == len(PROMPTS), pipe.prompt_cache_info()


def test_to_the_device_the_pipeline_is_on_keeps_the_prompt_cache():
    pipe = make_tiny_pipeline(seed=0)
    run(pipe)
    pipe.to("cpu")
    pipe.to(torch.device("cpu"))
    run(pipe)
    assert pipe.prompt_cache_info()["hits"] == len(PROMPTS), pipe.prompt_cache_info()
