"""The light mask decoder: shapes, the codec hook, training, FLOPs, and its place in the pipeline."""

import contextlib
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from digseg_diffusers import DiGSegPipeline, mask_codec
from digseg_diffusers.mask_decoder import (
    DiGSegMaskDecoder,
    count_flops,
    evaluate_mask_decoders,
    fit_mask_decoder,
    mask_iou,
)
from digseg_diffusers.data.synthetic import generate_scene
from digseg_diffusers.testing_utils import assert_close_across_paths, make_tiny_pipeline, make_tiny_vae


def small_decoder(seed: int = 0, widths=(16, 8, 8, 8)) -> DiGSegMaskDecoder:
    torch.manual_seed(seed)
    return DiGSegMaskDecoder(latent_channels=4, block_out_channels=widths).eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic_masks(num_scenes: int, size: int = 32) -> torch.Tensor:
    masks = []
    for seed in range(num_scenes):
        scene = generate_scene(seed, size=size)
        masks += [torch.from_numpy(scene.mask(c)) for c in scene.class_indices]
    return torch.stack(masks).float()


def test_output_is_one_logit_per_pixel_at_the_vae_scale():
    decoder = small_decoder()
    assert decoder.upsampling_factor == 8
    logits = decoder(torch.randn(3, 4, 5, 7))
    assert logits.shape == (3, 1, 40, 56)
    assert DiGSegMaskDecoder(block_out_channels=(8, 8)).upsampling_factor == 2


def test_codec_hook_returns_sigmoid_probabilities_and_skips_the_vae():
    decoder = small_decoder()
    vae = make_tiny_vae()
    vae.decode = None  # the light path must not touch the VAE decoder
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        probabilities = mask_codec.decode_masks(vae, latents, mask_decoder=decoder)
        torch.testing.assert_close(probabilities, torch.sigmoid(decoder(latents)))
    assert probabilities.shape == (2, 1, 32, 32) and probabilities.dtype == torch.float32
    assert 0.0 <= float(probabilities.min()) and float(probabilities.max()) <= 1.0


def test_mask_iou_pools_over_masks():
    targets = torch.zeros(2, 1, 4, 4)
    targets[0, 0, :2] = 1  # 8 pixels
    targets[1, 0, :, :1] = 1  # 4 pixels
    predicted = targets.clone()
    predicted[1] = 0  # second mask missed: intersection 8, union 12
    assert mask_iou(predicted, targets) == pytest.approx(8 / 12)
    assert np.isnan(mask_iou(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)))


@contextlib.contextmanager
def one_thread():
    """Backward passes of tiny convolutions: on a loaded 2-core machine two OpenMP threads wait on each other
    (measured 140 s vs 3 s for this test), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@one_thread()
def test_training_learns_to_decode_a_vae_s_mask_latents():
    torch.manual_seed(0)
    vae = make_tiny_vae().eval()
    masks = synthetic_masks(12)
    with torch.no_grad():
        latents = mask_codec.encode_masks(vae, masks)
    # A random VAE's latents are far from unit variance: `input_scale` normalises them.
    decoder = DiGSegMaskDecoder(block_out_channels=(16, 16, 8, 8), input_scale=1.0 / float(latents.std()))
    with torch.no_grad():
        before = mask_iou(torch.sigmoid(decoder(latents)), masks[:, None])
    losses = fit_mask_decoder(decoder, latents, masks, num_steps=200, batch_size=16, learning_rate=1e-2, seed=0)
    assert len(losses) == 200 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    with torch.no_grad():
        after = mask_iou(torch.sigmoid(decoder(latents)), masks[:, None])
    assert after > before + 0.2
    report = evaluate_mask_decoders(vae, decoder, masks)
    assert report["num_masks"] == masks.shape[0]
    assert report["iou_light"] == pytest.approx(after, abs=1e-6)
    assert report["iou_difference_points"] == pytest.approx(100 * (report["iou_light"] - report["iou_vae"]))


def test_fit_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="latents"):
        fit_mask_decoder(small_decoder(), torch.zeros(3, 4, 2, 2), torch.zeros(2, 16, 16), num_steps=1)


def test_default_decoder_needs_over_100x_fewer_flops_than_the_sd_vae_decoder():
    # Meta tensors: FLOPs are counted from shapes without running the 2.5 TFLOP decoder.
    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )
        decoder = DiGSegMaskDecoder()
        latents = torch.randn(1, 4, 64, 64)
    full = count_flops(mask_codec.decode_masks, vae, latents)
    light = count_flops(mask_codec.decode_masks, vae, latents, mask_decoder=decoder)
    assert full > 2e12  # the SD decoder at 512 px: ~2.5 TFLOP
    assert full / light > 100


def pipe_with_decoder(decoder=None) -> DiGSegPipeline:
    pipe = make_tiny_pipeline(seed=0)
    pipe.register_modules(mask_decoder=decoder if decoder is not None else small_decoder())
    return pipe


def test_pipeline_uses_the_light_decoder_by_default_and_vae_on_request(tiny_pipe, rgb_image):
    pipe = pipe_with_decoder()
    kwargs = dict(processing_resolution=0, num_inference_steps=1)
    plain = tiny_pipe(rgb_image, ["circle", "star"], generator=seeded(0), **kwargs)
    default = pipe(rgb_image, ["circle", "star"], generator=seeded(0), output_latent=True, **kwargs)
    light = pipe(rgb_image, ["circle", "star"], generator=seeded(0), mask_decoder="light", **kwargs)
    vae = pipe(rgb_image, ["circle", "star"], generator=seeded(0), mask_decoder="vae", **kwargs)
    np.testing.assert_array_equal(vae.probabilities[0], plain.probabilities[0])
    np.testing.assert_array_equal(default.probabilities[0], light.probabilities[0])
    with torch.no_grad():
        expected = mask_codec.decode_masks(pipe.vae, default.latents, mask_decoder=pipe.mask_decoder)[:, 0].numpy()
    assert_close_across_paths(default.probabilities[0], expected, what="decoded probabilities")
    assert not np.allclose(light.probabilities[0], vae.probabilities[0], atol=1e-2)


def test_pipeline_mask_decoder_argument_errors(tiny_pipe, rgb_image):
    with pytest.raises(ValueError, match="mask_decoder"):
        tiny_pipe(rgb_image, "circle", processing_resolution=0, mask_decoder="light")
    with pytest.raises(ValueError, match="mask_decoder"):
        pipe_with_decoder()(rgb_image, "circle", processing_resolution=0, mask_decoder="tiny")
    wrong_scale = pipe_with_decoder(small_decoder(widths=(8, 8)))
    with pytest.raises(ValueError, match="mask_decoder"):
        wrong_scale(rgb_image, "circle", processing_resolution=0)


def test_save_load_keeps_the_decoder_and_old_folders_still_load(rgb_image, tmp_path):
    pipe = pipe_with_decoder()
    pipe.save_pretrained(tmp_path / "with")
    loaded = DiGSegPipeline.from_pretrained(tmp_path / "with")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.mask_decoder, DiGSegMaskDecoder)
    a = pipe(rgb_image, "circle", processing_resolution=0, generator=seeded(1)).probabilities[0]
    b = loaded(rgb_image, "circle", processing_resolution=0, generator=seeded(1)).probabilities[0]
    assert_close_across_paths(b, a, what="reloaded probabilities")  # memory-mapped weights: float32 rounding

    # A folder saved before the component existed has no "mask_decoder" entry at all.
    plain = make_tiny_pipeline(seed=0)
    plain.save_pretrained(tmp_path / "old")
    index_path = tmp_path / "old" / "model_index.json"
    index = json.loads(index_path.read_text())
    index.pop("mask_decoder", None)
    index_path.write_text(json.dumps(index))
    old = DiGSegPipeline.from_pretrained(tmp_path / "old")
    assert old.mask_decoder is None


@one_thread()
def test_training_script_writes_decoder_summary_and_pipeline(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "train_mask_decoder.py"
    spec = importlib.util.spec_from_file_location("digseg_train_mask_decoder", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    make_tiny_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    summary = module.main([
        "--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--output_dir", str(out), "--resolution", "32",
        "--num_train_scenes", "3", "--num_eval_scenes", "2", "--max_train_steps", "2", "--train_batch_size", "4",
        "--num_distill_scenes", "1", "--save_pipeline",
    ])
    decoder = DiGSegMaskDecoder.from_pretrained(out / "mask_decoder")
    assert decoder.upsampling_factor == 8 and decoder.config.input_scale != 1.0  # set from the latent std
    saved = json.loads((out / "summary.json").read_text())
    assert saved["eval"]["num_masks"] == summary["eval"]["num_masks"] > 0
    masks_per_scene = [len(generate_scene(seed, size=32).class_indices) for seed in (0, 1, 2, 5_000_000)]
    assert summary["num_train_masks"] == sum(masks_per_scene)  # 3 mask scenes + 1 scene of denoiser latents
    assert set(saved["decode_flops_per_mask"]) == {"32", "512"}
    pipe = DiGSegPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe.mask_decoder, DiGSegMaskDecoder)


@pytest.mark.slow
def test_a_saved_decoder_loads_in_a_fresh_process(tmp_path):
    # diffusers resolves a component's library only if it is already imported: the pipeline module must import it.
    import subprocess
    import sys

    pipe_with_decoder().save_pretrained(tmp_path)
    code = (
        "import sys; from digseg_diffusers import DiGSegPipeline; "
        f"pipe = DiGSegPipeline.from_pretrained({str(tmp_path)!r}); "
        "print(type(pipe.mask_decoder).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "DiGSegMaskDecoder"
