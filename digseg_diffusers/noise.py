"""Training noise for DiGSeg: multi-resolution noise, optionally annealed over the diffusion timestep.

Masks are mostly large flat regions, whose low frequencies white noise destroys slowly: at high t the model can
still read the layout from ``z_t`` and never learns to produce it. Low-resolution ("pyramid") noise destroys the
coarse structure too; annealing it with t keeps the noise near the white noise DDPM assumes close to ``t = 0``.
The construction (``method.md`` section 3, the paper's appendix A.1)::

    eps = eps_0 + sum_{i >= 1} w_i(t) * up(eps_i),   then divided by its std (per sample)

``eps_i`` is Gaussian at the latent resolution divided by ``r**i`` (``r ~ U[2, 4]`` per sample; floored, at least
one pixel), ``up`` bilinear upsampling; the pyramid stops after the first level one pixel high or wide (or at
``max_levels``). The mean is left alone (coarse levels give a per-channel offset, as offset noise does).
The paper's Table 4 variants (``NOISE_VARIANTS``; it never defines "annealed" and "multi-resolution" apart):

- ``"gaussian"``: exactly ``torch.randn`` (no rescaling), the standard DDPM noise.
- ``"annealed"``: only the first pyramid level, annealed: ``eps_0 + (s * t / T) * up(eps_1)`` (a lone Gaussian
  is scale-free after renormalisation; the smallest change annealing can make: the paper's "minor effect").
- ``"multires"``: the full pyramid with fixed weights ``w_i = s**i``.
- ``"multires_annealed"`` (default): ``w_i(t) = (s * t / T)**i``, strong low frequencies at high noise that fade
  as ``t -> 0`` (the appendix; the main text's sentence saying the opposite is ignored).

Only the training noise changes; inference still starts from ``N(0, I)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .scheduling import check_generator_list

NOISE_VARIANTS: tuple[str, ...] = ("gaussian", "annealed", "multires", "multires_annealed")
DEFAULT_NOISE_VARIANT = "multires_annealed"
DEFAULT_NOISE_STRENGTH = 0.9
# Downscale factor r of each pyramid, drawn per sample in [MIN, MAX].
DOWNSCALE_RANGE: tuple[float, float] = (2.0, 4.0)

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def _check_num_train_timesteps(num_train_timesteps: int) -> None:
    if not isinstance(num_train_timesteps, int) or num_train_timesteps <= 0:
        raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}.")


def _draw(sample, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Float32 ``sample`` (``torch.randn`` / ``torch.rand``) drawn on the generator's device (so a CPU generator
    gives the same numbers everywhere), moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    return sample(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def _per_sample_generators(generator: GeneratorArg, batch_size: int) -> list[torch.Generator | None] | None:
    """``None`` for a single shared generator (or none); one generator per sample for a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    generators = list(generator)
    check_generator_list(generators, batch_size, f"one generator per sample ({batch_size}) or a single generator")
    return generators


def _timesteps_per_sample(timesteps: torch.Tensor | int | float, batch_size: int, device: torch.device) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=device).to(torch.float32).flatten()
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(batch_size)
    if timesteps.numel() != batch_size:
        raise ValueError(
            f"`timesteps` has {timesteps.numel()} values but the batch has {batch_size} samples; "
            "pass one timestep per sample or a single timestep."
        )
    return timesteps


def pyramid_level_weights(
    timesteps: torch.Tensor | int | float,
    num_train_timesteps: int,
    num_levels: int,
    variant: str = DEFAULT_NOISE_VARIANT,
    strength: float = DEFAULT_NOISE_STRENGTH,
) -> torch.Tensor:
    """Weights ``w_i`` of pyramid levels ``i = 1..num_levels`` for each timestep, shape ``[B, num_levels]``.

    Exposed so the schedule can be inspected or plotted without drawing noise.
    """
    _check_variant(variant)
    t = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    exponents = torch.arange(1, num_levels + 1, dtype=torch.float32, device=t.device)
    if variant == "gaussian":
        return torch.zeros(t.numel(), num_levels, device=t.device)
    if variant == "multires":
        return (strength**exponents).expand(t.numel(), num_levels).clone()
    base = (strength * t / num_train_timesteps).clamp(min=0.0)[:, None]
    weights = base**exponents
    if variant == "annealed":
        weights[:, 1:] = 0.0
    return weights


def _check_variant(variant: str) -> None:
    if variant not in NOISE_VARIANTS:
        raise ValueError(f"Unknown noise `variant` {variant!r}; choose one of {', '.join(NOISE_VARIANTS)}.")


def sample_training_noise(
    latents_like: torch.Tensor,
    timesteps: torch.Tensor | int | float,
    num_train_timesteps: int = 1000,
    variant: str = DEFAULT_NOISE_VARIANT,
    strength: float = DEFAULT_NOISE_STRENGTH,
    generator: GeneratorArg = None,
    max_levels: int = 10,
) -> torch.Tensor:
    """Draw DiGSeg training noise with the shape, device and dtype of ``latents_like`` (``[B, C, H, W]``).

    Args:
        latents_like: only its shape, device and dtype are used.
        timesteps: the diffusion timestep of each sample (``[B]``) or one for all; ``0 <= t < T``.
        num_train_timesteps: ``T`` of the noise schedule (1000 for SD).
        variant: one of ``NOISE_VARIANTS`` (see the module docstring).
        strength: ``s`` in ``w_i(t) = (s * t / T)**i``; in ``[0, 1]``, 0.9 in the paper.
        generator: a ``torch.Generator`` (deterministic output; it may live on another device than the latents),
            a list of one generator per sample, or ``None``.
        max_levels: most pyramid levels above ``eps_0``.

    Returns:
        The noise, ``latents_like.shape``; unit std per sample except for ``"gaussian"``, which is exactly
        ``torch.randn`` with the same generator.
    """
    _check_variant(variant)
    if latents_like.ndim != 4:
        raise ValueError(f"`latents_like` must be [B, C, H, W], got shape {tuple(latents_like.shape)}.")
    _check_num_train_timesteps(num_train_timesteps)
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"`strength` must be in [0, 1], got {strength!r}.")
    if not isinstance(max_levels, int) or max_levels < 1:
        raise ValueError(f"`max_levels` must be a positive int, got {max_levels!r}.")

    batch_size, channels, height, width = latents_like.shape
    device, dtype = latents_like.device, latents_like.dtype
    generators = _per_sample_generators(generator, batch_size)
    timesteps = _timesteps_per_sample(timesteps, batch_size, device)

    # eps_0 first, in one draw, so that "gaussian" is plain randn and all variants share eps_0 under one seed.
    if generators is None:
        noise = _draw(torch.randn, (batch_size, channels, height, width), generator, device)
    else:
        noise = torch.cat([_draw(torch.randn, (1, channels, height, width), g, device) for g in generators])
    if variant == "gaussian":
        return noise.to(dtype)

    num_levels = 1 if variant == "annealed" else max_levels
    weights = pyramid_level_weights(timesteps, num_train_timesteps, num_levels, variant, float(strength))
    low, high = DOWNSCALE_RANGE
    if generators is None:
        ratios = (low + (high - low) * _draw(torch.rand, (batch_size,), generator, device)).tolist()
    else:
        ratios = [low + (high - low) * _draw(torch.rand, (1,), g, device).item() for g in generators]

    samples = []
    for index in range(batch_size):
        sample_generator = generator if generators is None else generators[index]
        sample = noise[index : index + 1]
        for level in range(1, num_levels + 1):
            scale = ratios[index] ** level
            level_height, level_width = max(1, int(height / scale)), max(1, int(width / scale))
            coarse = _draw(torch.randn, (1, channels, level_height, level_width), sample_generator, device)
            upsampled = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
            sample = sample + weights[index, level - 1] * upsampled
            if level_height == 1 or level_width == 1:
                break
        samples.append(sample)
    noise = torch.cat(samples)
    noise = noise / noise.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    return noise.to(dtype)


TIMESTEP_BIAS_STRATEGIES: tuple[str, ...] = ("none", "later", "earlier")


def check_timestep_bias(bias_strategy: str, bias_multiplier: float, bias_portion: float) -> None:
    """Raise ``ValueError`` for a bias setting `sample_training_timesteps` cannot use (multiplier and portion are
    only read, hence only checked, when the strategy is not ``"none"``). The training script calls it at start-up."""
    if bias_strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(
            f"Unknown timestep `bias_strategy` {bias_strategy!r}; choose one of {', '.join(TIMESTEP_BIAS_STRATEGIES)}."
        )
    if bias_strategy == "none":
        return
    if not bias_multiplier > 0:
        raise ValueError(f"`bias_multiplier` must be positive, got {bias_multiplier!r}.")
    if not 0.0 < bias_portion <= 1.0:
        raise ValueError(f"`bias_portion` must be in (0, 1], got {bias_portion!r}.")


def sample_training_timesteps(
    batch_size: int,
    num_train_timesteps: int = 1000,
    bias_strategy: str = "none",
    bias_multiplier: float = 1.0,
    bias_portion: float = 0.25,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one training timestep per sample: ``t ~ U{0..T-1}`` (``"none"``: exactly ``torch.randint``), or biased.

    ``bias_strategy="later"`` multiplies the sampling weight of the last ``bias_portion`` of the timesteps by
    ``bias_multiplier`` (``"earlier"``: the first portion), as diffusers' SDXL training script does. 1-step
    inference only asks the model at ``t = T - 1``, and a model trained from scratch on a small budget learns that
    map several times faster from mostly high-noise samples (the embedded demo model's recipe).
    """
    check_timestep_bias(bias_strategy, bias_multiplier, bias_portion)
    _check_num_train_timesteps(num_train_timesteps)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    generator_device = generator.device if generator is not None else torch.device(device)
    if bias_strategy == "none":
        return torch.randint(0, num_train_timesteps, (batch_size,), device=generator_device, generator=generator).to(device)
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    count = max(1, int(round(num_train_timesteps * bias_portion)))
    if bias_strategy == "later":
        weights[num_train_timesteps - count :] *= bias_multiplier
    else:
        weights[:count] *= bias_multiplier
    return torch.multinomial(weights.to(generator_device), batch_size, replacement=True, generator=generator).to(device)
