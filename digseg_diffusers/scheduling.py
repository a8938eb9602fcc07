"""Which diffusers schedulers run DiGSeg's denoising, and the per-step details every one of them needs.

DiGSeg is trained on the DDPM noise process; one DDIM step with trailing spacing already gives a mask (method.md
section 4). `DiGSegPipeline` runs the schedulers below from 1 step (tests/test_schedulers.py), drawing step noise
per row so that results do not depend on how rows are batched.
"""

from __future__ import annotations

import functools
import inspect

import torch

SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "LCMScheduler",
    "TCDScheduler",
)
"""diffusers schedulers (and their subclasses) that `DiGSegPipeline` runs, each tested from 1 step
(tests/test_schedulers.py); `check_inputs` refuses others before any work. Left out: schedulers of other noise
processes than the DDPM one DiGSeg is trained with (flow matching, EDM, VE-SDE, consistency models, inversion),
PNDM (its PRK warm-up fails below 4 steps), and those needing packages that are not dependencies (LMS: scipy,
DPM-Solver SDE: torchsde)."""


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler that `DiGSegPipeline` does not run (see `SUPPORTED_SCHEDULERS`), naming those it does."""
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    if not names & set(SUPPORTED_SCHEDULERS):
        raise ValueError(
            f"`scheduler` is a {type(scheduler).__name__}, which DiGSegPipeline does not support; use one of "
            f"{', '.join(SUPPORTED_SCHEDULERS)} (e.g. `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`)."
        )


@functools.lru_cache(maxsize=None)
def _step_signature_has_generator(scheduler_class: type) -> bool:
    return "generator" in inspect.signature(scheduler_class.step).parameters


def step_accepts_generator(scheduler) -> bool:
    """Whether the scheduler's `step` draws noise (takes a `generator`); looked up once per scheduler class."""
    return _step_signature_has_generator(type(scheduler))


def row_generators(generator, num_rows: int, device: torch.device) -> list | None:
    """One generator per row for a stochastic scheduler's step noise: the given list, or seeds drawn from one."""
    if generator is None or isinstance(generator, list):
        return generator
    seeds = torch.randint(2**62, (num_rows,), generator=generator, device=generator.device).tolist()
    return [torch.Generator(device=generator.device).manual_seed(seed) for seed in seeds]


def next_latents(step, last: bool) -> torch.Tensor:
    """The latents after a scheduler step; the last step keeps the x0 estimate where the scheduler gives one.

    DDIM's last step would otherwise land on ``alphas_cumprod[0]`` rather than x0 when `set_alpha_to_one` is
    False; LCM names its estimate `denoised`; multistep solvers (DPM-Solver, UniPC, DEIS) end at sigma 0, so
    their `prev_sample` already is x0.
    """
    if last:
        for name in ("pred_original_sample", "denoised"):
            estimate = getattr(step, name, None)
            if estimate is not None:
                return estimate
    return step.prev_sample


def check_initial_noise(latents, generator, expected_shape: tuple[int, ...]) -> None:
    """Check `latents` (the initial noise of every row, ``expected_shape``) and `generator` (one, or one per row)."""
    num_rows = expected_shape[0]
    if latents is not None:
        if generator is not None:
            raise ValueError("`latents` and `generator` cannot be used together.")
        if not torch.is_tensor(latents) or tuple(latents.shape) != tuple(expected_shape):
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(
                f"`latents` has shape {shape}; expected {tuple(expected_shape)} (images x prompts x ensemble_size "
                "rows, image-major)."
            )
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` contains NaN or infinite values.")
    if isinstance(generator, list):
        expected = f"one generator per row: {num_rows} (images x prompts x ensemble_size)"
        check_generator_list(generator, num_rows, expected)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator or a list of them; got {type(generator).__name__}.")


def check_generator_list(generators: list, count: int, expected: str) -> None:
    """Refuse a list of generators that is not `count` `torch.Generator`s (`expected` says what each is for)."""
    if len(generators) != count:
        raise ValueError(f"`generator` is a list of {len(generators)}; expected {expected}.")
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError("`generator` list must contain only `torch.Generator` objects.")
