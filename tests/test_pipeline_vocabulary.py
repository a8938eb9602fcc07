"""`DiGSegPipeline(vocabulary=...)`: every class as a candidate, or the classes a class proposer picks."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digseg_diffusers.pipeline_digseg import DiGSegPipeline
from digseg_diffusers.pipeline_hub import CLASS_PROPOSER_SUBFOLDER
from digseg_diffusers.proposal import DiGSegClassProposer
from digseg_diffusers.testing_utils import make_tiny_pipeline
from digseg_diffusers.testing_utils import make_tiny_clip_model as make_tiny_clip
from digseg_diffusers.tokenization import build_char_clip_tokenizer
from digseg_diffusers.vocabularies import Vocabulary

CLASSES = ["circle", "square", "star", "heart"]




class ControlledProposer(DiGSegClassProposer):
    """A real proposer whose CLIP towers are replaced: class k embeds as e_k; image i embeds as `image_vectors[i]`."""

    def __init__(self, image_vectors, **kwargs):
        super().__init__(make_tiny_clip(), build_char_clip_tokenizer(), patch_threshold=None, **kwargs)
        self.image_vectors = image_vectors
        self.calls = []

    def _embed_texts(self, prompts):
        return torch.stack([torch.eye(5)[next(i for i, c in enumerate(CLASSES) if f" {c}." in p)] for p in prompts])

    def _embed_pixels(self, pixel_values):
        self.calls.append(pixel_values.shape[0])
        vectors = torch.stack([F.normalize(torch.tensor(v, dtype=torch.float32), dim=0) for v in self.image_vectors])
        return vectors, vectors[:, None]


@pytest.fixture
def images():
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]


def run(pipe, images, **kwargs):
    return pipe(images, num_inference_steps=1, processing_resolution=32, generator=torch.Generator().manual_seed(0), **kwargs)


def test_vocabulary_without_proposer_segments_every_class(tiny_pipe, images):
    by_prompt = run(tiny_pipe, images, prompt=CLASSES)
    by_vocabulary = run(tiny_pipe, images, vocabulary=CLASSES)
    assert by_vocabulary.prompts == [CLASSES, CLASSES]
    for a, b in zip(by_prompt.probabilities, by_vocabulary.probabilities):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(by_prompt.label_maps, by_vocabulary.label_maps):
        np.testing.assert_array_equal(a, b)


def test_vocabulary_object_and_bundled_name(tiny_pipe, images):
    vocabulary = Vocabulary(name="shapes", class_names=CLASSES[:2], label_ids=[1, 2])
    assert run(tiny_pipe, images[:1], vocabulary=vocabulary).prompts == [CLASSES[:2]]
    out = tiny_pipe(images[0], vocabulary="cityscapes-19", num_inference_steps=1, processing_resolution=32, batch_size=19)
    assert len(out.prompts[0]) == 19 and out.prompts[0][0] == "road"
    assert out.probabilities[0].shape == (19, 32, 32)


def test_proposer_picks_the_classes_of_each_image(images):
    pipe = make_tiny_pipeline()
    # image 0: circle (0.8) and star (0.5) clear the 0.25 threshold; image 1: heart only.
    proposer = ControlledProposer([[0.8, 0.0, 0.5, 0.0, 0.3], [0.0, 0.1, 0.0, 0.9, 0.4]])
    pipe.set_class_proposer(proposer)
    out = run(pipe, images, vocabulary=CLASSES)
    assert out.prompts == [["circle", "star"], ["heart"]]
    assert proposer.calls == [2]  # one batched proposal call for both images
    assert out.probabilities[0].shape == (2, 32, 32) and out.probabilities[1].shape == (1, 32, 32)
    # The proposed classes are segmented exactly as if they had been given as per-image prompts.
    reference = run(pipe, images, prompt=[["circle", "star"], ["heart"]])
    for a, b in zip(reference.probabilities, out.probabilities):
        np.testing.assert_array_equal(a, b)
    assert int(out.label_maps[1].max()) <= 1


def test_proposer_removed_falls_back_to_all_classes(images):
    pipe = make_tiny_pipeline()
    pipe.set_class_proposer(ControlledProposer([[0.8, 0.0, 0.0, 0.0, 0.3]]))
    assert run(pipe, images[:1], vocabulary=CLASSES).prompts == [["circle"]]
    pipe.set_class_proposer(None)
    assert run(pipe, images[:1], vocabulary=CLASSES).prompts == [CLASSES]


def test_empty_proposal_is_a_clear_error(images):
    pipe = make_tiny_pipeline()
    pipe.set_class_proposer(ControlledProposer([[0.0, 0.0, 0.0, 0.0, 1.0]], min_classes=0))
    with pytest.raises(ValueError, match="proposed no class for image"):
        run(pipe, images[:1], vocabulary=CLASSES)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=["circle"], vocabulary=CLASSES), "either `prompt`.*`vocabulary`.*not both"),
        (dict(), "either `prompt`.*`vocabulary`"),
        (dict(vocabulary=[]), "`vocabulary` must be"),
        (dict(vocabulary=["circle", ""]), "`vocabulary` entries"),
        (dict(vocabulary="no-such-vocabulary"), "Unknown vocabulary"),
    ],
)
def test_vocabulary_argument_errors(tiny_pipe, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe(images[0], num_inference_steps=1, processing_resolution=32, **kwargs)


def test_set_class_proposer_rejects_objects_without_propose(tiny_pipe):
    with pytest.raises(ValueError, match="propose"):
        make_tiny_pipeline().set_class_proposer(object())


def test_save_and_load_keep_the_proposer(tmp_path, images):
    pipe = make_tiny_pipeline()
    proposer = DiGSegClassProposer(make_tiny_clip(), build_char_clip_tokenizer(), global_threshold=-1.0, top_k=2)
    pipe.set_class_proposer(proposer)
    pipe.save_pretrained(tmp_path / "pipe")
    assert os.path.isfile(tmp_path / "pipe" / CLASS_PROPOSER_SUBFOLDER / "proposer_config.json")

    loaded = DiGSegPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.class_proposer, DiGSegClassProposer)
    assert loaded.class_proposer.top_k == 2 and loaded.class_proposer.global_threshold == -1.0
    assert loaded.class_proposer.propose(images, CLASSES) == proposer.propose(images, CLASSES)
    loaded.set_progress_bar_config(disable=True)
    out = run(loaded, images, vocabulary=CLASSES)
    assert out.prompts == proposer.propose(images, CLASSES) and all(len(p) == 2 for p in out.prompts)

    assert DiGSegPipeline.from_pretrained(tmp_path / "pipe", class_proposer=None).class_proposer is None


def test_pipeline_without_proposer_saves_and_loads_none(tmp_path):
    make_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    assert not os.path.exists(tmp_path / "pipe" / CLASS_PROPOSER_SUBFOLDER)
    assert DiGSegPipeline.from_pretrained(tmp_path / "pipe").class_proposer is None


def test_pipe_to_moves_the_class_proposer_too():
    from digseg_diffusers.testing_utils import make_tiny_class_proposer

    pipe = make_tiny_pipeline()
    proposer = make_tiny_class_proposer()
    pipe.set_class_proposer(proposer)
    moved = []
    proposer.to = lambda *args, **kwargs: moved.append((args, kwargs)) or proposer
    assert pipe.to("cpu") is pipe and moved == [(("cpu",), {})]
    pipe.to(dtype=torch.float32)  # a dtype-only move leaves the proposer's precision alone
    assert len(moved) == 1
