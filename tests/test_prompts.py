"""One prompt-list rule for the CLI and ComfyUI, and the training vocabulary a closed-vocabulary model records."""

import logging

import pytest
import torch

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.prompts import parse_prompts, prompts_outside_vocabulary
from digseg_diffusers.data.synthetic import SHAPE_CLASSES
from digseg_diffusers.testing_utils import make_tiny_pipeline


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cat, dog", ["cat", "dog"]),
        ("cat\ndog\r\nsky", ["cat", "dog", "sky"]),
        ("  cat ,, \n\n dog ,", ["cat", "dog"]),
        ("red car, cat\nred car", ["red car", "cat"]),
        ("a man in a hat", ["a man in a hat"]),
        ("", []),
        (" , \n ", []),
        (None, []),
    ],
)
def test_parse_prompts(text, expected):
    assert parse_prompts(text) == expected


def test_parse_prompts_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a string"):
        parse_prompts(["cat"])


def test_prompts_outside_vocabulary_normalises_and_reads_synonyms():
    vocabulary = ["circle", "tv, television", "traffic light"]
    prompts = ["Circle", "television", "traffic  light", "cat", "cat", "person"]
    assert prompts_outside_vocabulary(prompts, vocabulary) == ["cat", "person"]
    assert prompts_outside_vocabulary(prompts, None) == []  # open vocabulary


def test_demo_model_records_its_training_vocabulary(caplog):
    pipe = DiGSegPipeline.from_pretrained("digseg-demo")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.training_vocabulary == list(SHAPE_CLASSES)
    assert pipe.prompts_outside_vocabulary(["star", "person", "cup"]) == ["person", "cup"]
    with caplog.at_level(logging.WARNING):
        pipe(torch.rand(1, 3, 32, 32), prompt=["star", "person"], processing_resolution=32)
    warnings = [r.getMessage() for r in caplog.records if "training vocabulary" in r.getMessage()]
    assert len(warnings) == 1 and "'person'" in warnings[0] and "'star'" not in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # once per prompt and pipeline, not on every call
        pipe(torch.rand(1, 3, 32, 32), prompt=["person"], processing_resolution=32)
    assert not [r for r in caplog.records if "training vocabulary" in r.getMessage()]
    # A caller that tells the user itself (the CLI) marks them reported: no second warning from the call.
    assert pipe.prompts_outside_vocabulary(["cup"], mark_reported=True) == ["cup"]
    with caplog.at_level(logging.WARNING):
        pipe(torch.rand(1, 3, 32, 32), prompt=["cup", "dog"], processing_resolution=32)
    warnings = [r.getMessage() for r in caplog.records if "training vocabulary" in r.getMessage()]
    assert len(warnings) == 1 and "'dog'" in warnings[0] and "'cup'" not in warnings[0]


def test_training_vocabulary_round_trips_and_is_validated(tmp_path):
    pipe = make_tiny_pipeline()
    assert pipe.config.training_vocabulary is None  # open vocabulary by default
    assert pipe.prompts_outside_vocabulary(["anything"]) == []
    pipe = make_tiny_pipeline(training_vocabulary=["cat", "dog"])
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = DiGSegPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.config.training_vocabulary == ["cat", "dog"]
    assert reloaded.prompts_outside_vocabulary("bird") == ["bird"]
    with pytest.raises(ValueError, match="training_vocabulary"):
        DiGSegPipeline(**{**reloaded.components, "training_vocabulary": "cat"})
