"""Any supported diffusers scheduler runs the pipeline, others are refused up front; generator and step callbacks."""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from digseg_diffusers.scheduling import SUPPORTED_SCHEDULERS
from digseg_diffusers.testing_utils import make_tiny_pipeline

STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler",
              "TCDScheduler", "SASolverScheduler")  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)


def _run(pipe, image, steps, seed=0, **kwargs):
    out = pipe(image, prompt=["circle", "star"], processing_resolution=32, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_latent=True, **kwargs)  # fmt: skip
    return out.latents


@pytest.fixture
def use_scheduler(pipe):
    original = pipe.scheduler

    def use(name, **config):
        pipe.scheduler = getattr(diffusers, name).from_config(original.config, **config)
        return pipe.scheduler

    yield use
    pipe.scheduler = original


@pytest.mark.slow
@pytest.mark.parametrize("name", SUPPORTED_SCHEDULERS)
def test_every_supported_scheduler_runs_from_one_step(pipe, image, use_scheduler, name):
    """These crashed on `step.pred_original_sample` (DPM-Solver, LCM, TCD, UniPC) or on a second chunk of rows."""
    use_scheduler(name)
    one_step = _run(pipe, image, 1, batch_size=1)  # 2 chunks: the scheduler's state restarts for each
    two_steps = _run(pipe, image, 2, batch_size=1)
    assert one_step.shape == two_steps.shape == (2, 4, 4, 4)
    assert torch.isfinite(one_step).all() and torch.isfinite(two_steps).all()
    # Every chunk denoises the same way: with one initial noise for all rows, chunking does not change results.
    assert torch.allclose(_run(pipe, image, 2, batch_size=8), two_steps, atol=1e-5)


def test_one_step_gives_the_same_x0_estimate_across_schedulers(pipe, image, use_scheduler):
    """From t = 999 in one step every deterministic DDPM-family solver lands on the U-Net's x0 estimate.

    DPM-Solver and UniPC (which crashed on `step.pred_original_sample`) compute in alpha space like DDIM; Euler
    works in sigma space (sigma_max ~ 14.6), where float32 leaves differences of ~1e-3 (measured 1.5e-3).
    """
    reference = _run(pipe, image, 1)
    for name, atol in (("DPMSolverMultistepScheduler", 1e-5), ("UniPCMultistepScheduler", 1e-5), ("EulerDiscreteScheduler", 5e-3)):
        use_scheduler(name, timestep_spacing="trailing")
        assert torch.allclose(_run(pipe, image, 1), reference, atol=atol), name


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"])
def test_generator_reaches_stochastic_schedulers(pipe, image, use_scheduler, name):
    assert name in STOCHASTIC
    use_scheduler(name)
    torch.manual_seed(1)
    first = _run(pipe, image, 2)
    torch.manual_seed(2)  # the global RNG must not matter: step noise comes from `generator`
    assert torch.equal(_run(pipe, image, 2), first)
    # Step noise is drawn per row from `generator`, so chunking does not change it.
    assert torch.allclose(_run(pipe, image, 2, batch_size=1), first, atol=1e-5)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "PNDMScheduler", "DDIMInverseScheduler"])
def test_unsupported_schedulers_are_refused_up_front_naming_the_supported_ones(pipe, image, use_scheduler, name):
    use_scheduler(name)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=f"{name}.*DDIMScheduler.*DPMSolverMultistepScheduler.*LCMScheduler"):
        _run(pipe, image, 2)
    assert not calls
    pipe.unet._forward_pre_hooks.clear()


def test_callback_on_step_end_sees_and_replaces_latents(pipe, image):
    seen = []

    def callback(p, step_index, timestep, callback_kwargs):
        assert p is pipe
        seen.append((step_index, int(timestep), tuple(callback_kwargs["latents"].shape), sorted(callback_kwargs)))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    latents = _run(pipe, image, 2, batch_size=1, callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    assert [s[:2] for s in seen] == [(0, timesteps[0]), (1, timesteps[1])] * 2  # 2 chunks x 2 steps
    assert all(s[2] == (1, 4, 4, 4) and s[3] == ["latents", "prompt_embeds"] for s in seen)
    assert torch.count_nonzero(latents) == 0  # the returned latents replaced the chunk's


def test_pipeline_callback_objects_and_bad_callback_arguments(pipe, image):
    class Recorder(PipelineCallback):
        tensor_inputs = ["image_latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.calls = getattr(self, "calls", 0) + 1
            assert set(callback_kwargs) == {"image_latents"}
            return callback_kwargs

    recorder = Recorder()
    _run(pipe, image, 2, callback_on_step_end=recorder)
    assert recorder.calls == 2
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(pipe, image, 1, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise_pred"])
    with pytest.raises(ValueError, match="callback_on_step_end"):
        _run(pipe, image, 1, callback_on_step_end="not callable")
