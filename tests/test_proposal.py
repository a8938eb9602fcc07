import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from digseg_diffusers.proposal import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, DiGSegClassProposer
from digseg_diffusers.testing_utils import assert_close_across_paths, write_hub_cache
from digseg_diffusers.testing_utils import make_tiny_clip_model as make_tiny_clip
from digseg_diffusers.tokenization import build_char_clip_tokenizer

CLASSES = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def tiny_clip():
    return make_tiny_clip()


def make_proposer(clip, **kwargs) -> DiGSegClassProposer:
    return DiGSegClassProposer(clip, build_char_clip_tokenizer(), **kwargs)


def unit(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1)


class ControlledEmbeddings:
    """Text embedding of class k is the basis vector e_k (axis 4 belongs to no class); images are chosen vectors."""

    def __init__(self, images):
        self.images = images  # list of (global [5], patches [P, 5])
        self.text_calls = 0

    def embed_texts(self, prompts):
        self.text_calls += 1
        rows = []
        for prompt in prompts:
            index = next(i for i, name in enumerate(CLASSES) if f" {name}." in prompt)
            rows.append(torch.eye(5)[index])
        return torch.stack(rows)

    def embed_pixels(self, pixel_values):
        assert pixel_values.shape[0] == len(self.images)
        return torch.stack([g for g, _ in self.images]), torch.stack([p for _, p in self.images])


# global cosines: cat 0.6, dog 0.2, bird 0.1, fish 0.0; best patch cosines: cat 1.0, bird 0.9, dog 0, fish 0
IMAGE_WITH_SMALL_BIRD = (
    unit(0.6, 0.2, 0.1, 0.0, (1 - 0.36 - 0.04 - 0.01) ** 0.5),
    torch.stack([unit(1, 0, 0, 0, 0), unit(0, 0, 0.9, 0, (1 - 0.81) ** 0.5), unit(0, 0, 0, 0, 1)]),
)
# global: fish 0.8, others 0; best patch cosines: fish 0.4, dog 0.3 (both below a 0.5 patch threshold)
IMAGE_WITH_FISH = (
    unit(0, 0, 0, 0.8, 0.6),
    torch.stack([unit(0, 0, 0, 0.4, 0.84**0.5), unit(0, 0.3, 0, 0, 0.91**0.5), unit(0, 0, 0, 0, 1)]),
)


def controlled(tiny_clip, monkeypatch, images, **kwargs):
    proposer = make_proposer(tiny_clip, **kwargs)
    fake = ControlledEmbeddings(images)
    monkeypatch.setattr(proposer, "_embed_texts", fake.embed_texts)
    monkeypatch.setattr(proposer, "_embed_pixels", fake.embed_pixels)
    return proposer, fake


def dummy_images(n):
    return [np.zeros((40, 30, 3), dtype=np.uint8)] * n


def test_global_threshold_only(tiny_clip, monkeypatch):
    proposer, _ = controlled(tiny_clip, monkeypatch, [IMAGE_WITH_SMALL_BIRD], patch_threshold=None, min_classes=0)
    scores = proposer.score(dummy_images(1), CLASSES)
    torch.testing.assert_close(scores.global_scores[0], torch.tensor([0.6, 0.2, 0.1, 0.0]), atol=1e-5, rtol=0)
    assert scores.patch_scores is None
    assert scores.proposals == [["cat"]]
    proposer.global_threshold = 0.15
    assert proposer.propose(dummy_images(1), CLASSES) == [["cat", "dog"]]


def test_patch_refinement_adds_a_class_the_global_score_misses(tiny_clip, monkeypatch):
    proposer, _ = controlled(tiny_clip, monkeypatch, [IMAGE_WITH_SMALL_BIRD], patch_threshold=0.5, min_classes=0)
    scores = proposer.score(dummy_images(1), CLASSES)
    torch.testing.assert_close(scores.patch_scores[0], torch.tensor([1.0, 0.0, 0.9, 0.0]), atol=1e-5, rtol=0)
    assert scores.global_scores[0, CLASSES.index("bird")] < proposer.global_threshold
    # ordered by margin over the threshold that let the class in: cat max(0.35, 0.5), bird 0.4
    assert scores.proposals == [["cat", "bird"]]
    proposer.patch_threshold = 0.95
    assert proposer.propose(dummy_images(1), CLASSES) == [["cat"]]


def test_per_image_proposals_in_a_batch(tiny_clip, monkeypatch):
    proposer, _ = controlled(
        tiny_clip, monkeypatch, [IMAGE_WITH_SMALL_BIRD, IMAGE_WITH_FISH], patch_threshold=0.5, min_classes=0
    )
    assert proposer.propose(dummy_images(2), CLASSES) == [["cat", "bird"], ["fish"]]


def test_call_overrides_leave_the_shared_proposer_unchanged(tiny_clip, monkeypatch):
    """Per-call thresholds give what a proposer configured with them gives, and change nothing stored."""
    proposer, _ = controlled(tiny_clip, monkeypatch, [IMAGE_WITH_SMALL_BIRD], patch_threshold=0.5, min_classes=0)
    settings = proposer.proposer_config()
    cases = [
        # (overrides, the same as constructor settings, expected proposals)
        ({"global_threshold": 0.15}, {"global_threshold": 0.15, "patch_threshold": 0.5}, [["cat", "bird", "dog"]]),
        ({"global_threshold": 0.15, "patch_threshold": math.inf}, {"global_threshold": 0.15, "patch_threshold": None},
         [["cat", "dog"]]),
        ({"patch_threshold": 0.95, "top_k": 1}, {"patch_threshold": 0.95, "top_k": 1}, [["cat"]]),
    ]  # fmt: skip
    for overrides, configured_settings, expected in cases:
        scores = proposer.score(dummy_images(1), CLASSES, **overrides)
        configured, _ = controlled(
            tiny_clip, monkeypatch, [IMAGE_WITH_SMALL_BIRD], min_classes=0, **configured_settings
        )
        reference = configured.score(dummy_images(1), CLASSES)
        assert scores.proposals == reference.proposals == expected, overrides
        assert torch.equal(scores.global_scores, reference.global_scores)
        assert (scores.patch_scores is None) == (reference.patch_scores is None)
        assert proposer.propose(dummy_images(1), CLASSES, **overrides) == expected
        assert proposer.proposer_config() == settings
    assert proposer.propose(dummy_images(1), CLASSES) == [["cat", "bird"]]  # the configured values again
    with pytest.raises(ValueError, match="top_k"):
        proposer.score(dummy_images(1), CLASSES, top_k=0)
    with pytest.raises(TypeError, match="threshold"):
        proposer.propose(dummy_images(1), CLASSES, threshold=0.2)  # a misspelt setting is not silently ignored


def test_top_k_caps_and_min_classes_fills(tiny_clip, monkeypatch):
    proposer, _ = controlled(tiny_clip, monkeypatch, [IMAGE_WITH_SMALL_BIRD], patch_threshold=0.5, top_k=1)
    assert proposer.propose(dummy_images(1), CLASSES) == [["cat"]]
    proposer.top_k, proposer.patch_threshold, proposer.global_threshold = None, None, 0.95
    proposer.min_classes = 0
    assert proposer.propose(dummy_images(1), CLASSES) == [[]]
    proposer.min_classes = 2  # best global scores fill up: cat 0.6, dog 0.2
    assert proposer.propose(dummy_images(1), CLASSES) == [["cat", "dog"]]


def test_vocabulary_embeddings_are_cached(tiny_clip, monkeypatch):
    proposer = make_proposer(tiny_clip, text_batch_size=2)
    calls = []
    real = proposer._embed_texts
    monkeypatch.setattr(proposer, "_embed_texts", lambda prompts: calls.append(list(prompts)) or real(prompts))
    image = torch.rand(3, 24, 24)
    first = proposer.score(image, CLASSES[:3])
    assert len(calls) == 2  # 3 prompts in chunks of 2
    assert calls[0] == ["A photo of a cat.", "A photo of a dog."]
    second = proposer.score(image, CLASSES[:3])
    assert len(calls) == 2, "a repeated vocabulary must not re-run the text encoder"
    torch.testing.assert_close(first.global_scores, second.global_scores)
    proposer.score(image, CLASSES)  # another vocabulary: encoded once more
    assert len(calls) == 4
    proposer.templates = ["a {} in the picture"]  # another template is another cache entry
    proposer.score(image, CLASSES)
    assert len(calls) == 6 and calls[-2][0] == "a cat in the picture"
    proposer.clear_cache()
    proposer.score(image, CLASSES)
    assert len(calls) == 8


def test_real_tiny_clip_scores_are_clip_cosines(tiny_clip):
    proposer = make_proposer(tiny_clip, global_threshold=-1.0, patch_threshold=None)
    image = torch.rand(1, 3, 32, 32)
    scores = proposer.score(image, CLASSES)
    tokens = proposer.tokenizer([f"A photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    pixels = proposer.preprocess(image)
    with torch.no_grad():
        out = tiny_clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    expected = out.logits_per_image / tiny_clip.logit_scale.exp()
    torch.testing.assert_close(scores.global_scores, expected, atol=1e-5, rtol=1e-5)
    assert len(scores.proposals[0]) == len(CLASSES)  # every cosine clears -1


def test_patch_tokens_are_projected_last_hidden_states(tiny_clip):
    proposer = make_proposer(tiny_clip, patch_threshold=0.3)
    image_embeds, patch_embeds = proposer.encode_images([PIL.Image.new("RGB", (50, 40), "red"), torch.rand(3, 20, 20)])
    assert image_embeds.shape == (2, 16) and patch_embeds.shape == (2, 16, 16)  # (32 / 8) ** 2 patches
    torch.testing.assert_close(patch_embeds.norm(dim=-1), torch.ones(2, 16))
    # documented choice: last encoder layer without CLS, post_layernorm, visual_projection
    image = torch.rand(1, 3, 20, 20)
    vision = tiny_clip.vision_model
    with torch.no_grad():
        hidden = vision(pixel_values=proposer.preprocess(image), output_hidden_states=True).hidden_states[-1]
        expected = F.normalize(tiny_clip.visual_projection(vision.post_layernorm(hidden[:, 1:])), dim=-1)
    torch.testing.assert_close(proposer.encode_images(image)[1], expected)
    scores = proposer.score(image, CLASSES)
    text = proposer.encode_vocabulary(CLASSES)
    torch.testing.assert_close(scores.patch_scores, (expected @ text.T).amax(dim=1))
    assert not torch.allclose(scores.patch_scores, scores.global_scores)
    # a larger input interpolates the position embeddings and yields more patches
    proposer.image_size = 48
    assert proposer.encode_images(torch.rand(3, 20, 20))[1].shape == (1, 36, 16)


def test_preprocess_is_the_same_for_every_input_form(tiny_clip):
    """PIL, uint8 / uint16 / float arrays, RGBA and CHW tensors of one non-square image give one CLIP input: the
    canonical float image resized as a whole (bicubic, antialiased) and normalised with CLIP's mean and std."""
    proposer = make_proposer(tiny_clip)  # 32 px input
    array = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    canonical = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0
    resized = F.interpolate(canonical, size=(32, 32), mode="bicubic", antialias=True).clamp(0.0, 1.0)
    expected = (resized - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    forms = {
        "PIL RGB": PIL.Image.fromarray(array),
        "PIL RGBA": PIL.Image.fromarray(array).convert("RGBA"),
        "uint8 HWC": array,
        "uint16 HWC": array.astype(np.uint16) * 257,
        "float32 HWC": array.astype(np.float32) / 255.0,
        "float CHW tensor": canonical[0],
        "float NCHW tensor": canonical,
    }
    for name, image in forms.items():
        assert_close_across_paths(proposer.preprocess(image), expected, what=name)
    batch = proposer.preprocess([forms["PIL RGB"], torch.rand(3, 50, 20)])  # a list of different sizes
    assert batch.shape == (2, 3, 32, 32)
    assert_close_across_paths(batch[:1], expected, what="first image of a list")
    with pytest.raises(ValueError, match=r"images\[0\].*\[0, 1\]"):
        proposer.preprocess(canonical[0] * 255.0)  # 0-255 floats are refused, not clipped to white


def test_accepts_bundled_vocabulary_names(tiny_clip):
    proposer = make_proposer(tiny_clip, global_threshold=2.0, patch_threshold=None, min_classes=3)
    proposals = proposer.propose(np.zeros((16, 16, 3), dtype=np.float32), "cityscapes")
    assert len(proposals) == 1 and len(proposals[0]) == 3
    from digseg_diffusers.vocabularies import load_vocabulary

    assert set(proposals[0]) <= set(load_vocabulary("cityscapes-19").class_names)


def test_save_and_load_roundtrip(tiny_clip, tmp_path):
    proposer = make_proposer(tiny_clip, global_threshold=0.1, patch_threshold=0.42, top_k=3, image_size=40)
    image = torch.rand(3, 32, 32)
    before = proposer.score(image, CLASSES)
    proposer.save_pretrained(tmp_path / "proposer")
    loaded = DiGSegClassProposer.from_pretrained(tmp_path / "proposer")
    assert loaded.proposer_config() == proposer.proposer_config()
    after = loaded.score(image, CLASSES)
    torch.testing.assert_close(after.global_scores, before.global_scores)
    torch.testing.assert_close(after.patch_scores, before.patch_scores)
    assert after.proposals == before.proposals
    overridden = DiGSegClassProposer.from_pretrained(tmp_path / "proposer", global_threshold=0.5, top_k=None)
    assert overridden.global_threshold == 0.5 and overridden.top_k is None and overridden.patch_threshold == 0.42


def test_plain_clip_folder_loads_with_defaults(tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    build_char_clip_tokenizer().save_pretrained(tmp_path / "clip")
    proposer = DiGSegClassProposer.from_pretrained(tmp_path / "clip")
    assert proposer.global_threshold == 0.25 and proposer.templates == ["A photo of a {}."]


def test_clear_errors(tiny_clip):
    with pytest.raises(ValueError, match="template"):
        make_proposer(tiny_clip, template="a photo")
    with pytest.raises(ValueError, match="top_k"):
        make_proposer(tiny_clip, top_k=0)
    proposer = make_proposer(tiny_clip)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        proposer.propose(["not an image"], CLASSES)
    with pytest.raises(ValueError, match="Unknown vocabulary"):
        proposer.propose(torch.rand(3, 8, 8), "no-such-vocabulary")
    with pytest.raises(ValueError, match="empty"):
        proposer.propose(torch.rand(3, 8, 8), [])


def test_from_pretrained_hub_id_honours_local_files_only(tmp_path, monkeypatch):
    """`local_files_only=True` reaches every Hub lookup: an uncached id fails at once instead of retrying online."""
    import huggingface_hub

    seen = []
    real_download = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OSError):
        DiGSegClassProposer.from_pretrained("digseg-test/not-cached-anywhere", local_files_only=True)
    assert seen and all(seen)


def test_loads_from_the_hub_cache_with_its_settings(tiny_clip, tmp_path):
    """A Hub id resolves the settings, the CLIP weights and the tokenizer through one cache (`cache_dir` included)."""
    proposer = make_proposer(tiny_clip, global_threshold=0.4, patch_threshold=None, top_k=2)
    proposer.save_pretrained(tmp_path / "proposer")
    write_hub_cache(tmp_path / "cache", "someone/tiny-proposer", tmp_path / "proposer")
    loaded = DiGSegClassProposer.from_pretrained(
        "someone/tiny-proposer", cache_dir=tmp_path / "cache", local_files_only=True
    )
    assert loaded.proposer_config() == proposer.proposer_config()
    image = torch.rand(3, 32, 32)
    assert_close_across_paths(loaded.score(image, CLASSES).global_scores, proposer.score(image, CLASSES).global_scores)
    with pytest.raises(OSError, match="not in the Hugging Face cache"):
        DiGSegClassProposer.from_pretrained("someone/absent", cache_dir=tmp_path / "cache", local_files_only=True)
