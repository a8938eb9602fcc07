"""The mask <-> latent codec: conventions, both VAE kinds, and that it is the path the pipeline decodes through."""

import pytest
import torch
from diffusers import AutoencoderTiny

from digseg_diffusers import mask_codec
from digseg_diffusers.testing_utils import make_tiny_vae


class IdentityVAE(torch.nn.Module):
    """A 'perfect' codec stand-in: latents are the pixels, so encode/decode must round-trip exactly."""

    class config:
        scaling_factor = 2.0

    dtype = torch.float32
    device = torch.device("cpu")

    def encode(self, pixels):
        class Posterior:
            def mode(self_inner):
                return pixels

        return type("Out", (), {"latent_dist": Posterior()})()

    def decode(self, latents, return_dict=False):
        return (latents,)


def test_masks_map_to_minus_one_one_on_three_channels():
    masks = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    pixels = mask_codec.masks_to_pixels(masks)
    assert pixels.shape == (1, 3, 2, 2)
    assert torch.equal(pixels[0, 2], torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    with pytest.raises(ValueError, match="masks"):
        mask_codec.masks_to_pixels(torch.zeros(2, 3, 4, 4))


def test_round_trip_through_a_perfect_codec_is_exact_and_scaled():
    vae = IdentityVAE()
    masks = (torch.rand(2, 8, 8) > 0.5).float()
    latents = mask_codec.encode_masks(vae, masks)
    assert torch.equal(latents, mask_codec.masks_to_pixels(masks) * 2.0)  # times scaling_factor
    assert torch.equal(mask_codec.decode_masks(vae, latents)[:, 0], masks)


def test_decoding_averages_channels_then_clamps():
    def probability(*channel_values):
        channels = torch.stack([torch.full((2, 2), v) for v in channel_values])[None]
        return mask_codec.mask_channels_to_probabilities(channels)[0, 0, 0, 0].item()

    assert probability(0.0, 0.5, 1.0) == pytest.approx(0.75)
    assert probability(-3.0, 0.5, 1.0) == pytest.approx(0.25)  # mean -0.5 first; clamping each channel would give 0.42
    assert probability(-3.0, -3.0, -3.0) == 0.0 and probability(5.0, 5.0, 5.0) == 1.0


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_real_vae_kinds_encode_and_decode_to_valid_shapes(kind):
    torch.manual_seed(0)
    if kind == "kl":
        vae = make_tiny_vae().eval()
    else:
        vae = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
        ).eval()  # fmt: skip
    masks = (torch.rand(2, 32, 32) > 0.5).float()
    with torch.no_grad():
        latents = mask_codec.encode_masks(vae, masks)
        probabilities = mask_codec.decode_masks(vae, latents)
        again = mask_codec.encode_masks(vae, masks)
    assert latents.shape == (2, 4, 4, 4)
    assert probabilities.shape == (2, 1, 32, 32)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    assert torch.equal(latents, again)  # the posterior mean, never a sample


def test_compute_dtype_agrees_with_diffusers_dtype_without_walking_the_model():
    from digseg_diffusers.testing_utils import make_tiny_unet

    for model in (make_tiny_unet(), make_tiny_vae()):
        assert mask_codec.compute_dtype(model) == model.dtype == torch.float32
        model.to(torch.bfloat16)
        assert mask_codec.compute_dtype(model) == model.dtype == torch.bfloat16
    unet = make_tiny_unet()
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert mask_codec.compute_dtype(unet) == unet.dtype == torch.bfloat16  # the compute dtype, not the storage one
