"""The pipeline's prompt-embedding cache: hits skip the text encoder, and no embedding outlives its weights."""

import numpy as np
import pytest
import torch

from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter
from digseg_diffusers.testing_utils import assert_close_across_paths, make_tiny_pipeline
from digseg_diffusers.vocabularies import load_vocabulary


class EncoderCalls:
    """Counts the text encoder's forward calls and the prompts they encode."""

    def __init__(self, pipe):
        self.calls, self.rows = 0, 0
        pipe.text_encoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.rows += args[0].shape[0]


def _fresh_embeddings(pipe, prompts):
    """What the text path gives right now, computed without the cache."""
    with torch.no_grad():
        return pipe._encode_prompts_uncached(list(prompts))


@pytest.fixture
def pipe():
    return make_tiny_pipeline(seed=0)


def test_a_hit_returns_the_same_embeddings_without_running_the_text_encoder(pipe):
    counter = EncoderCalls(pipe)
    with torch.no_grad():
        first = pipe.encode_prompts(["circle", "star"])
        second = pipe.encode_prompts(["star", "circle", "star"])
    assert counter.calls == 1 and counter.rows == 2
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0]) and torch.equal(second[2], first[1])
    assert_close_across_paths(first, _fresh_embeddings(pipe, ["circle", "star"]), what="cached embeddings")
    second.add_(1.0)  # a caller writing into its result leaves the cache alone
    with torch.no_grad():
        assert torch.equal(pipe.encode_prompts(["circle"])[0], first[0])
    assert pipe.prompt_cache_info()["hits"] == 4 and pipe.prompt_cache_info()["misses"] == 2


def test_pipeline_calls_reuse_the_embeddings_and_give_the_uncached_results(pipe, rgb_image):
    def segment():
        return pipe(rgb_image, ["circle", "star"], processing_resolution=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).probabilities[0]

    pipe.set_prompt_cache_size(0)
    uncached = segment()
    pipe.set_prompt_cache_size(16)
    counter = EncoderCalls(pipe)
    first, second = segment(), segment()
    assert counter.calls == 1
    assert torch.equal(first, second)
    assert_close_across_paths(first, uncached, what="probabilities with cached prompts")


def test_a_vocabulary_is_encoded_once_for_many_calls(pipe, rgb_image):
    names = load_vocabulary("ade20k-150").class_names
    assert pipe.cache_prompt_embeddings("ade20k-150") == len(set(names))
    assert pipe.prompt_cache_info()["max_size"] >= len(set(names))  # grown to hold the whole vocabulary
    counter = EncoderCalls(pipe)
    for start in range(0, 12, 4):
        pipe(rgb_image, list(names[start : start + 4]), processing_resolution=32, generator=torch.Generator().manual_seed(0))
    assert counter.calls == 0
    with pytest.raises(ValueError, match="non-empty"):
        pipe.cache_prompt_embeddings([])


def test_least_recently_used_prompts_are_evicted_first(pipe):
    pipe.set_prompt_cache_size(2)
    counter = EncoderCalls(pipe)
    with torch.no_grad():
        for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
            pipe.encode_prompts([prompt])
        assert counter.rows == 3
        pipe.encode_prompts(["a"])
        pipe.encode_prompts(["c"])
        assert counter.rows == 3
        pipe.encode_prompts(["b"])
    assert counter.rows == 4 and pipe.prompt_cache_info()["size"] == 2
    pipe.set_prompt_cache_size(1)
    assert pipe.prompt_cache_info()["size"] == 1
    with pytest.raises(ValueError, match="non-negative integer"):
        pipe.set_prompt_cache_size(-1)


def test_weights_written_in_place_or_moved_invalidate_the_cache(pipe):
    counter = EncoderCalls(pipe)
    with torch.no_grad():
        before = pipe.encode_prompts(["circle"])
        for parameter in pipe.text_projection.parameters():
            parameter.mul_(1.5)  # e.g. load_state_dict or an optimizer step: the version counter moves
        after = pipe.encode_prompts(["circle"])
        assert counter.calls == 2 and not torch.allclose(after, before)
        pipe.text_encoder.embeddings.token_embedding.weight.add_(0.1)  # the text encoder counts too
        pipe.encode_prompts(["circle"])
        assert counter.calls == 3
        pipe.to(torch.float64)
        moved = pipe.encode_prompts(["circle"])
        assert counter.calls == 4 and moved.dtype == torch.float64
        assert_close_across_paths(moved, _fresh_embeddings(pipe, ["circle"]), what="embeddings after in-place writes")


def test_a_training_text_path_bypasses_the_cache(pipe):
    counter = EncoderCalls(pipe)
    pipe.text_projection.train()
    with torch.no_grad():
        pipe.encode_prompts(["circle"])
        pipe.encode_prompts(["circle"])
    assert counter.calls == 2 and pipe.prompt_cache_info()["size"] == 0
    pipe.text_projection.eval()
    parameters = apply_adapter(pipe.unet, pipe.text_projection, DiGSegAdapterConfig(rank=2, levels=(2,)))
    states = pipe.encode_prompts(["circle"])  # grad mode, trainable projection: a graph, never a cached tensor
    assert states.requires_grad and counter.calls == 3 and pipe.prompt_cache_info()["size"] == 0
    states.sum().backward()
    with torch.no_grad():  # between backward and the step, the weights are about to change: no cache
        pipe.encode_prompts(["circle"])
    assert counter.calls == 4 and pipe.prompt_cache_info()["size"] == 0


@pytest.mark.parametrize("foreach", [False, True])
def test_an_optimizer_step_between_calls_invalidates_the_cache(pipe, foreach):
    """Validation during training: eval mode and no grad, but every step changes the projection."""
    parameters = apply_adapter(pipe.unet, pipe.text_projection, DiGSegAdapterConfig(rank=2, levels=(2,)))
    optimizer = torch.optim.AdamW(parameters, lr=0.1, foreach=foreach)
    for _ in range(2):
        pipe.text_projection.train()
        pipe.encode_prompts(["circle"]).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pipe.text_projection.eval()
        with torch.no_grad():
            got = pipe.encode_prompts(["circle"])
        assert_close_across_paths(got, _fresh_embeddings(pipe, ["circle"]), what="embeddings after a step")


def test_no_stale_embedding_after_loading_switching_or_unloading_a_lora(pipe, tmp_path):
    trained = make_tiny_pipeline(seed=0)
    parameters = apply_adapter(trained.unet, trained.text_projection, DiGSegAdapterConfig(rank=2, levels=(2,)))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))
    trained.save_digseg_adapter(tmp_path / "adapter")
    base = _fresh_embeddings(pipe, ["circle"])

    def check(what):
        with torch.no_grad():
            got = pipe.encode_prompts(["circle"])
        assert_close_across_paths(got, _fresh_embeddings(pipe, ["circle"]), what=what)
        return got

    assert_close_across_paths(check("base"), base)  # now cached
    pipe.load_lora_weights(tmp_path / "adapter")
    loaded = check("after load_lora_weights")
    assert (loaded - base).abs().max() > 1e-3  # the adapter's text projection differs from the base one
    pipe.disable_lora()
    assert_close_across_paths(check("after disable_lora"), base)
    pipe.enable_lora()
    assert_close_across_paths(check("after enable_lora"), loaded)
    pipe.set_adapters(["digseg"], 0.5)
    half = check("after set_adapters at weight 0.5")
    assert (half - loaded).abs().max() > 1e-4
    pipe.unload_lora_weights()
    assert_close_across_paths(check("after unload_lora_weights"), base)
    pipe.load_digseg_adapter(tmp_path / "adapter")
    assert_close_across_paths(check("after load_digseg_adapter"), loaded)


def test_output_is_unchanged_by_the_cache_for_every_call(pipe):
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    pipe.cache_prompt_embeddings(["circle"])
    cached = pipe(image, "circle", processing_resolution=32, output_latent=True, generator=torch.Generator().manual_seed(0))
    pipe.clear_prompt_cache()
    pipe.set_prompt_cache_size(0)
    plain = pipe(image, "circle", processing_resolution=32, output_latent=True, generator=torch.Generator().manual_seed(0))
    assert_close_across_paths(cached.latents, plain.latents, what="latents")


def test_weights_made_in_inference_mode_are_cached_and_replacements_detected():
    """ComfyUI loads and runs models under `torch.inference_mode()`: its weights have no version counter."""
    with torch.inference_mode():
        pipe = make_tiny_pipeline()
        first = pipe.encode_prompts(["cat", "dog"])
        again = pipe.encode_prompts(["dog", "cat"])
        assert pipe.prompt_cache_info()["hits"] == 2
        assert torch.equal(again, first.flip(0))
        # A replaced weight (new tensor, as loading or `to()` gives) is a new fingerprint: encoded afresh.
        layer = next(m for m in pipe.text_projection.modules() if isinstance(m, torch.nn.Linear))
        layer.weight = torch.nn.Parameter(layer.weight * 2, requires_grad=False)
        changed = pipe.encode_prompts(["cat"])
    assert pipe.prompt_cache_info()["misses"] == 3
    assert not torch.allclose(changed, first[:1])
