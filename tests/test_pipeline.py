"""Behaviour of `DiGSegPipeline` on tiny random components (no download)."""

import numpy as np
import pytest
import torch
from PIL import Image

from digseg_diffusers import BACKGROUND_LABEL, DiGSegOutput, DiGSegPipeline
from digseg_diffusers.testing_utils import (
    CROSS_PATH_ATOL,
    assert_close_across_paths,
    make_tiny_components,
    make_tiny_pipeline,
)

# Rows batched differently go through kernels of other shapes, which sum in another order: float32 results
# agree to ~1e-6, not bit for bit. Comparisons across batch compositions use the suite's cross-path tolerance.
BATCH_ATOL = CROSS_PATH_ATOL


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run(pipe, image, prompt, **kwargs):
    kwargs.setdefault("processing_resolution", 0)
    return pipe(image, prompt, **kwargs)


def test_output_structure(tiny_pipe, rgb_image):
    out = run(tiny_pipe, [rgb_image, rgb_image[::-1].copy()], ["circle", "star", "ring"], generator=seeded(0)[0])
    assert isinstance(out, DiGSegOutput)
    assert len(out.probabilities) == len(out.masks) == len(out.label_maps) == 2
    assert out.prompts == [["circle", "star", "ring"]] * 2
    for probs, masks, labels in zip(out.probabilities, out.masks, out.label_maps):
        assert probs.shape == masks.shape == (3, 64, 64)
        assert probs.dtype == np.float32 and masks.dtype == bool and labels.dtype == np.int64
        assert probs.min() >= 0.0 and probs.max() <= 1.0
        np.testing.assert_array_equal(masks, probs > tiny_pipe.config.default_mask_threshold)
    assert out.uncertainty is None and out.latents is None


def test_label_map_is_argmax_with_background(tiny_pipe, rgb_image):
    out = run(tiny_pipe, rgb_image, ["circle", "star", "ring"], background_threshold=0.5, generator=seeded(3)[0])
    probs, labels = out.probabilities[0], out.label_maps[0]
    expected = np.where(probs.max(0) >= 0.5, probs.argmax(0) + 1, BACKGROUND_LABEL)
    np.testing.assert_array_equal(labels, expected)
    assert (labels == BACKGROUND_LABEL).any() and (labels != BACKGROUND_LABEL).any()  # random net: both occur


def test_save_load_round_trip_gives_the_same_masks(tiny_pipe, rgb_image, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("*.bin")), "weights must be saved as safetensors only"
    loaded = DiGSegPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.text_projection).__name__ == "DiGSegTextProjection"
    a = run(tiny_pipe, rgb_image, ["circle", "star"], generator=seeded(0)[0], num_inference_steps=2)
    b = run(loaded, rgb_image, ["circle", "star"], generator=seeded(0)[0], num_inference_steps=2)
    # Loaded weights may be memory-mapped at other alignments (another kernel path): float32 rounding only.
    assert_close_across_paths(b.probabilities[0], a.probabilities[0], what="reloaded probabilities")
    assert loaded.config.default_mask_threshold == tiny_pipe.config.default_mask_threshold


def test_same_generator_same_output_and_seeds_matter(tiny_pipe, rgb_image):
    a = run(tiny_pipe, rgb_image, "circle", generator=seeded(7)[0]).probabilities[0]
    b = run(tiny_pipe, rgb_image, "circle", generator=seeded(7)[0]).probabilities[0]
    c = run(tiny_pipe, rgb_image, "circle", generator=seeded(8)[0]).probabilities[0]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_k_prompts_equal_k_single_prompt_calls(tiny_pipe, rgb_image):
    prompts = ["circle", "star", "cross"]
    together = run(tiny_pipe, rgb_image, prompts, generator=seeded(0, 1, 2), num_inference_steps=2)
    for k, p in enumerate(prompts):
        alone = run(tiny_pipe, rgb_image, p, generator=seeded(k), num_inference_steps=2)
        np.testing.assert_allclose(together.probabilities[0][k], alone.probabilities[0][0], atol=BATCH_ATOL)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_results_do_not_depend_on_batch_size(tiny_pipe, rgb_image, batch_size):
    images = [rgb_image, rgb_image[:, ::-1].copy()]
    kwargs = dict(ensemble_size=2, num_inference_steps=2)
    reference = run(tiny_pipe, images, ["a", "bb"], batch_size=2, generator=seeded(5)[0], **kwargs)
    other = run(tiny_pipe, images, ["a", "bb"], batch_size=batch_size, generator=seeded(5)[0], **kwargs)
    for x, y in zip(reference.probabilities, other.probabilities):
        np.testing.assert_allclose(x, y, atol=BATCH_ATOL)


def test_ensemble_of_identical_seeds_equals_single_run(tiny_pipe, rgb_image):
    single = run(tiny_pipe, rgb_image, "star", generator=seeded(4))
    ensemble = run(tiny_pipe, rgb_image, "star", ensemble_size=3, generator=seeded(4, 4, 4), output_uncertainty=True)
    np.testing.assert_allclose(ensemble.probabilities[0], single.probabilities[0], atol=BATCH_ATOL)
    assert np.abs(ensemble.uncertainty[0]).max() < BATCH_ATOL


def test_ensemble_uncertainty_and_latents(tiny_pipe, rgb_image):
    out = run(
        tiny_pipe, rgb_image, ["a", "b"], ensemble_size=3, generator=seeded(1)[0], output_uncertainty=True,
        output_latent=True,
    )
    assert out.uncertainty[0].shape == (2, 64, 64) and out.uncertainty[0].max() > 0
    assert tuple(out.latents.shape) == (2 * 3, 4, 8, 8)


def test_explicit_latents_match_generator(tiny_pipe, rgb_image):
    noise = torch.randn((2, 4, 8, 8), generator=seeded(9)[0])
    a = run(tiny_pipe, rgb_image, ["a", "b"], latents=noise)
    b = run(tiny_pipe, rgb_image, ["a", "b"], generator=seeded(9)[0])
    np.testing.assert_array_equal(a.probabilities[0], b.probabilities[0])


def test_per_image_prompt_lists(tiny_pipe, rgb_image):
    out = run(tiny_pipe, [rgb_image, rgb_image], [["circle"], ["star", "ring", "cross"]], generator=seeded(0)[0])
    assert [p.shape[0] for p in out.probabilities] == [1, 3]
    assert out.prompts == [["circle"], ["star", "ring", "cross"]]


def test_repeated_prompt_is_encoded_once(rgb_image):
    pipe = make_tiny_pipeline()
    seen = []
    original = pipe.encode_prompts
    pipe.encode_prompts = lambda prompts: seen.append(list(prompts)) or original(prompts)
    run(pipe, [rgb_image, rgb_image], [["star", "ring"], ["ring", "star", "star"]], generator=seeded(0)[0])
    assert seen == [["star", "ring"]]


@pytest.mark.parametrize(
    "make_image, size",
    [
        (lambda: np.random.RandomState(0).randint(0, 256, (37, 51, 3), dtype=np.uint8), (37, 51)),  # odd size
        (lambda: np.random.RandomState(0).randint(0, 256, (40, 24), dtype=np.uint8), (40, 24)),  # grayscale 2D
        (lambda: Image.new("L", (30, 20), 128), (20, 30)),
        (lambda: Image.new("RGBA", (33, 17), (10, 200, 30, 90)), (17, 33)),
        (lambda: Image.fromarray(np.full((16, 24), 40000, dtype=np.uint16)), (16, 24)),  # 16-bit PIL
        (lambda: np.full((16, 24, 3), 65535, dtype=np.uint16), (16, 24)),  # 16-bit numpy
        (lambda: np.random.RandomState(0).rand(24, 16, 4).astype(np.float32), (24, 16)),  # RGBA float
        (lambda: torch.rand(3, 21, 19), (21, 19)),  # CHW tensor
        (lambda: Image.new("P", (16, 16)), (16, 16)),  # palette
    ],
)
def test_image_kinds_are_handled(tiny_pipe, make_image, size):
    out = tiny_pipe(make_image(), "circle", processing_resolution=32, generator=seeded(0)[0])
    assert out.probabilities[0].shape == (1, *size)
    assert out.label_maps[0].shape == size


def test_processing_resolution_and_match_input_resolution(tiny_pipe):
    image = np.zeros((48, 96, 3), dtype=np.uint8)
    out = tiny_pipe(image, "a", processing_resolution=32, match_input_resolution=False, generator=seeded(0)[0])
    assert out.probabilities[0].shape == (1, 16, 32)
    out = tiny_pipe(image, "a", processing_resolution=32, generator=seeded(0)[0])
    assert out.probabilities[0].shape == (1, 48, 96)


def test_output_types(tiny_pipe, rgb_image):
    pt = run(tiny_pipe, rgb_image, ["a", "b"], output_type="pt", generator=seeded(0)[0])
    assert torch.is_tensor(pt.probabilities[0]) and pt.probabilities[0].shape == (2, 64, 64)
    assert pt.masks[0].dtype == torch.bool and pt.label_maps[0].dtype == torch.int64
    pil = run(tiny_pipe, rgb_image, ["a", "b"], output_type="pil", generator=seeded(0)[0])
    assert len(pil.probabilities[0]) == 2 and pil.probabilities[0][0].size == (64, 64)
    assert pil.masks[0][1].mode == "L" and set(np.unique(np.asarray(pil.masks[0][1]))) <= {0, 255}
    np.testing.assert_array_equal(np.asarray(pil.label_maps[0]), pt.label_maps[0].numpy())
    as_tuple = run(tiny_pipe, rgb_image, "a", return_dict=False, generator=seeded(0)[0])
    as_dict = run(tiny_pipe, rgb_image, "a", generator=seeded(0)[0])
    # diffusers' BaseOutput.to_tuple: the fields that are not None, in field order, without holes.
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 4
    np.testing.assert_array_equal(as_tuple[2][0], as_dict.label_maps[0])
    assert as_tuple[3] == [["a"]]
    masks_only = run(tiny_pipe, rgb_image, "a", return_dict=False, output_probabilities=False, generator=seeded(0)[0])
    assert len(masks_only) == 3 and masks_only[0][0].dtype == bool and masks_only[2] == [["a"]]


def test_progress_callback_counts_and_cancels(tiny_pipe, rgb_image):
    calls = []
    run(tiny_pipe, rgb_image, ["a", "b", "c"], num_inference_steps=2, batch_size=2, progress_callback=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 chunks x 2 steps

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        run(tiny_pipe, rgb_image, "a", progress_callback=cancel)


def test_autoencoder_tiny_is_accepted(rgb_image):
    from diffusers import AutoencoderTiny

    components = make_tiny_components()
    torch.manual_seed(0)
    components["vae"] = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    ).eval()
    pipe = DiGSegPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    out = run(pipe, rgb_image, "a", generator=seeded(0)[0])
    assert out.probabilities[0].shape == (1, 64, 64)


def test_fewer_steps_than_training_steps_only(tiny_pipe, rgb_image):
    for steps in (1, 4):
        out = run(tiny_pipe, rgb_image, "a", num_inference_steps=steps, generator=seeded(0)[0])
        assert np.isfinite(out.probabilities[0]).all()


BAD_ARGUMENTS = [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=2000), "num_inference_steps"),
    (dict(num_inference_steps=1.5), "num_inference_steps"),
    (dict(ensemble_size=0), "ensemble_size"),
    (dict(processing_resolution=-8), "processing_resolution"),
    (dict(processing_resolution=30), "processing_resolution"),
    (dict(resample_method_input="lanczos"), "resample_method_input"),
    (dict(batch_size=0), "batch_size"),
    (dict(mask_threshold=1.5), "mask_threshold"),
    (dict(background_threshold=-0.1), "background_threshold"),
    (dict(output_type="jpg"), "output_type"),
    (dict(output_uncertainty=True), "output_uncertainty"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents"),
    (dict(latents=torch.zeros(1, 4, 8, 8), generator=torch.Generator()), "latents"),
    (dict(generator=[torch.Generator()] * 3), "generator"),
    (dict(generator="seed"), "generator"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=["ok", 3]), "prompt"),
    (dict(prompt=[["a"], ["b"]]), "prompt"),  # two lists for one image
    (dict(image=[]), "image"),
    (dict(image="scene.png"), "image"),
    (dict(image=[np.zeros((8, 8, 3), np.uint8), np.zeros((16, 8, 3), np.uint8)]), "image"),
    (dict(image=np.zeros((8, 8, 3), np.int32)), "image"),
    (dict(image=torch.full((3, 8, 8), 2.0)), "image"),
    (dict(image=np.zeros((8, 8, 5), np.uint8)), "image"),
]


@pytest.mark.parametrize("overrides, argument", BAD_ARGUMENTS, ids=[a for _, a in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error_naming_the_argument(tiny_pipe, overrides, argument):
    kwargs = dict(image=np.zeros((64, 64, 3), np.uint8), prompt="circle", processing_resolution=0)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=f"`{argument}"):
        tiny_pipe(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_on_cpu_with_resizing(dtype):
    """Antialiased resizing has no half CPU kernel: the pipeline resizes in float32, then casts."""
    pipe = make_tiny_pipeline()
    reference = pipe(np.zeros((40, 50, 3), np.uint8), ["a"], processing_resolution=32, generator=seeded(0)[0])
    pipe.to(dtype=dtype)
    out = pipe(np.zeros((40, 50, 3), np.uint8), ["a"], processing_resolution=32, generator=seeded(0)[0])
    assert out.probabilities[0].shape == (1, 40, 50) and out.probabilities[0].dtype == np.float32
    assert np.abs(out.probabilities[0] - reference.probabilities[0]).max() < 0.1


def test_execution_device_follows_offload_hooks():
    """The fast path (no hooks: `self.device`) and the hooked path (the parent's answer) both hold, and under a
    hook the image encoder gets its inputs where the hook runs the VAE, not where its weights sit (CPU offload)."""
    pipe = make_tiny_pipeline()
    assert pipe._execution_device == torch.device("cpu")

    class FakeOffloadHook:  # what accelerate's offload hooks expose to diffusers
        execution_device = "meta"

    hooked = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    for module in hooked:
        module._hf_hook = FakeOffloadHook()
    try:
        assert pipe._execution_device == torch.device("meta")
        seen = []
        original = pipe.vae.encode
        pipe.vae.encode = lambda pixels, *a, **k: seen.append(pixels.device) or original(torch.zeros(pixels.shape), *a, **k)
        latents = pipe.encode_images(torch.zeros(2, 3, 16, 16), batch_size=1)
        assert seen == [torch.device("meta")] * 2 and latents.shape == (2, 4, 2, 2)
    finally:
        for module in hooked:
            del module._hf_hook
        pipe.vae.__dict__.pop("encode", None)
    assert pipe._execution_device == torch.device("cpu")


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_label_maps_are_computed_chunk_by_chunk_like_one_argmax(tiny_pipe, rgb_image, batch_size):
    prompts = ["circle", "star", "ring", "cross", "square"]
    out = run(tiny_pipe, rgb_image, prompts, batch_size=batch_size, background_threshold=0.45, generator=seeded(2)[0])
    probs = out.probabilities[0]
    expected = np.where(probs.max(0) >= 0.45, probs.argmax(0) + 1, BACKGROUND_LABEL)
    np.testing.assert_array_equal(out.label_maps[0], expected)  # ties keep the first prompt in both
    assert len(np.unique(out.label_maps[0])) >= 3  # several prompts win somewhere: chunks really compete


def test_label_map_only_and_compact_probabilities(tiny_pipe, rgb_image):
    prompts = ["circle", "star", "ring"]
    full = run(tiny_pipe, rgb_image, prompts, batch_size=2, generator=seeded(1)[0])
    labels_only = run(
        tiny_pipe, rgb_image, prompts, batch_size=2, generator=seeded(1)[0], output_probabilities=False,
        output_masks=False,
    )
    assert labels_only.probabilities is None and labels_only.masks is None
    np.testing.assert_array_equal(labels_only.label_maps[0], full.label_maps[0])  # same computation
    compact = run(tiny_pipe, rgb_image, prompts, batch_size=2, generator=seeded(1)[0], probability_dtype="uint8")
    assert compact.probabilities[0].dtype == np.uint8
    np.testing.assert_array_equal(compact.probabilities[0], np.round(full.probabilities[0] * 255).astype(np.uint8))
    np.testing.assert_array_equal(compact.masks[0], full.masks[0])  # masks come from the float32 maps
    half = run(tiny_pipe, rgb_image, prompts, generator=seeded(1)[0], probability_dtype="float16", output_type="pt")
    assert half.probabilities[0].dtype == torch.float16
    np.testing.assert_allclose(half.probabilities[0].float().numpy(), full.probabilities[0], atol=1e-3)
    # the same batch_size as `compact`: another chunking is another code path, and a rounding at 0.5 / 255 then moves
    # a uint8 level (seen on one CPU)
    pil = run(
        tiny_pipe, rgb_image, prompts, batch_size=2, generator=seeded(1)[0], probability_dtype="uint8", output_type="pil"
    )
    np.testing.assert_array_equal(np.asarray(pil.probabilities[0][1]), compact.probabilities[0][1])
    with pytest.raises(ValueError, match="probability_dtype"):
        run(tiny_pipe, rgb_image, prompts, probability_dtype="int8")


def test_casting_prints_no_empty_keep_in_fp32_warning():
    """diffusers warned "should be kept in float32: []" once per component on every `pipe.to(dtype)`."""
    import logging

    from diffusers.models.modeling_utils import logger as modeling_logger

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    modeling_logger.addHandler(handler)
    try:
        pipe = make_tiny_pipeline()
        pipe.to(torch.bfloat16)
        assert not [r for r in records if "float32" in r.getMessage()]
        pipe.unet._keep_in_fp32_modules = ["conv_in"]  # a real list is still reported
        pipe.unet.to(torch.float32)
        assert any("should be kept in float32: ['conv_in']" in r.getMessage() for r in records)
    finally:
        modeling_logger.removeHandler(handler)
