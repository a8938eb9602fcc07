import pytest
import torch
import torch.nn.functional as F

from digseg_diffusers.noise import NOISE_VARIANTS, pyramid_level_weights, sample_training_noise, sample_training_timesteps
from digseg_diffusers.testing_utils import assert_close_across_paths

T = 1000


def _latents(batch=16, channels=4, size=64, dtype=torch.float32):
    return torch.zeros(batch, channels, size, size, dtype=dtype)


def _low_frequency_energy(noise: torch.Tensor, pool: int = 16) -> float:
    """Mean energy left after heavy average pooling; ~1/pool**2 for white noise of unit variance."""
    return F.avg_pool2d(noise.float(), pool).pow(2).mean().item()


def _noise(variant, t, seed=0, **kwargs):
    latents = kwargs.pop("latents", None)
    latents = _latents() if latents is None else latents
    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    return sample_training_noise(latents, timesteps, T, variant=variant, generator=generator, **kwargs)


@pytest.mark.parametrize("variant", ["annealed", "multires", "multires_annealed"])
@pytest.mark.parametrize("t", [0, 500, 999])
def test_unit_std_per_sample(variant, t):
    noise = _noise(variant, t)
    assert noise.shape == (16, 4, 64, 64)
    assert torch.isfinite(noise).all()
    torch.testing.assert_close(noise.std(dim=(1, 2, 3)), torch.ones(16), atol=1e-4, rtol=0)


def test_gaussian_is_plain_randn():
    latents = _latents()
    generator = torch.Generator().manual_seed(3)
    noise = sample_training_noise(latents, torch.arange(16) * 60, T, variant="gaussian", generator=generator)
    expected = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise, expected)
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - 1.0) < 0.02
    # White noise: pooling over 16x16 pixels divides the variance by 256.
    assert _low_frequency_energy(noise) == pytest.approx(1 / 256, rel=0.3)


def test_annealing_low_frequency_energy_falls_as_t_goes_to_zero():
    energies = [_low_frequency_energy(_noise("multires_annealed", t)) for t in (999, 750, 500, 250, 0)]
    assert all(high > low for high, low in zip(energies, energies[1:])), energies
    # At t = 999 the coarse levels dominate; at t = 0 only eps_0 is left (white noise).
    assert energies[0] > 20 * energies[-1], energies
    assert energies[-1] == pytest.approx(1 / 256, rel=0.3)


def test_multires_without_annealing_ignores_the_timestep():
    assert torch.equal(_noise("multires", 0), _noise("multires", 999))
    assert _low_frequency_energy(_noise("multires", 0)) > 20 / 256


def test_annealed_alone_adds_one_coarse_level():
    gaussian = _low_frequency_energy(_noise("gaussian", 999))
    annealed = _low_frequency_energy(_noise("annealed", 999))
    full = _low_frequency_energy(_noise("multires_annealed", 999))
    assert gaussian < annealed < full
    # At t = 0 the annealed weight vanishes: only eps_0 (renormalised) is left.
    eps_0 = _noise("gaussian", 0)
    torch.testing.assert_close(_noise("annealed", 0), eps_0 / eps_0.std(dim=(1, 2, 3), keepdim=True))


def test_level_weights():
    weights = pyramid_level_weights(torch.tensor([0, 500, 1000]), T, 3, "multires_annealed", 0.9)
    torch.testing.assert_close(weights[1], torch.tensor([0.45, 0.45**2, 0.45**3]))
    assert torch.equal(weights[0], torch.zeros(3))
    torch.testing.assert_close(weights[2], torch.tensor([0.9, 0.81, 0.729]))
    multires = pyramid_level_weights(torch.tensor([0, 999]), T, 2, "multires", 0.5)
    torch.testing.assert_close(multires, torch.tensor([[0.5, 0.25], [0.5, 0.25]]))
    annealed = pyramid_level_weights(torch.tensor([1000]), T, 2, "annealed", 0.9)
    torch.testing.assert_close(annealed, torch.tensor([[0.9, 0.0]]))


@pytest.mark.parametrize("variant", NOISE_VARIANTS)
def test_deterministic_under_a_generator(variant):
    timesteps = torch.randint(0, T, (4,), generator=torch.Generator().manual_seed(0))
    latents = _latents(batch=4, size=32)
    first = sample_training_noise(latents, timesteps, T, variant, generator=torch.Generator().manual_seed(7))
    second = sample_training_noise(latents, timesteps, T, variant, generator=torch.Generator().manual_seed(7))
    other = sample_training_noise(latents, timesteps, T, variant, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_per_sample_generators_match_single_sample_draws():
    latents = _latents(batch=3, size=32)
    timesteps = torch.tensor([10, 500, 990])
    batched = sample_training_noise(
        latents, timesteps, T, generator=[torch.Generator().manual_seed(s) for s in range(3)]
    )
    for index in range(3):
        alone = sample_training_noise(
            latents[index : index + 1], timesteps[index], T, generator=torch.Generator().manual_seed(index)
        )
        # Same draws; the batched resize and renormalisation may sum in another order (float32 rounding only).
        assert_close_across_paths(batched[index : index + 1], alone, what=f"noise of sample {index}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_follows_latents(dtype):
    noise = _noise("multires_annealed", 800, latents=_latents(batch=2, size=32, dtype=dtype))
    assert noise.dtype == dtype
    reference = _noise("multires_annealed", 800, latents=_latents(batch=2, size=32))
    torch.testing.assert_close(noise.float(), reference, atol=2e-2, rtol=2e-2)


def test_scalar_timestep_and_non_square_latents():
    noise = sample_training_noise(torch.zeros(2, 4, 8, 40), 999, T, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4, 8, 40)
    torch.testing.assert_close(noise.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-4, rtol=0)


def test_bad_arguments():
    latents = _latents(batch=2, size=16)
    with pytest.raises(ValueError, match="variant.*'pyramid'.*gaussian, annealed, multires, multires_annealed"):
        sample_training_noise(latents, 10, T, variant="pyramid")
    with pytest.raises(ValueError, match="strength"):
        sample_training_noise(latents, 10, T, strength=1.5)
    with pytest.raises(ValueError, match="timesteps"):
        sample_training_noise(latents, torch.tensor([1, 2, 3]), T)
    with pytest.raises(ValueError, match="generator"):
        sample_training_noise(latents, 10, T, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="latents_like"):
        sample_training_noise(torch.zeros(4, 16, 16), 10, T)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        sample_training_noise(latents, 10, 0)


def test_unbiased_timesteps_are_plain_randint():
    # The method's t ~ U{0..T-1}: "none" must draw exactly what torch.randint draws, so runs and resumes made
    # before the bias option existed stay reproducible.
    drawn = sample_training_timesteps(64, 1000, generator=torch.Generator().manual_seed(3))
    expected = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, expected)


@pytest.mark.parametrize("strategy", ["later", "earlier"])
def test_timestep_bias_moves_samples_to_the_chosen_end(strategy):
    drawn = sample_training_timesteps(
        20000, 1000, bias_strategy=strategy, bias_multiplier=30.0, bias_portion=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    assert drawn.min() >= 0 and drawn.max() <= 999
    in_portion = (drawn >= 900) if strategy == "later" else (drawn < 100)
    expected_share = 0.1 * 30 / (0.1 * 30 + 0.9)  # 0.77
    assert abs(in_portion.float().mean().item() - expected_share) < 0.02
    # every timestep stays reachable
    assert ((drawn < 900) if strategy == "later" else (drawn >= 100)).any()


def test_timestep_bias_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bias_strategy"):
        sample_training_timesteps(4, bias_strategy="middle")
    with pytest.raises(ValueError, match="bias_multiplier"):
        sample_training_timesteps(4, bias_strategy="later", bias_multiplier=0.0)
    with pytest.raises(ValueError, match="bias_portion"):
        sample_training_timesteps(4, bias_strategy="later", bias_portion=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        sample_training_timesteps(0)
