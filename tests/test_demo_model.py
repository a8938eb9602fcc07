"""The embedded demo model: shipped in the package, loadable by path and short name, and accurate on held-out scenes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from digseg_diffusers import DiGSegPipeline, demo
from digseg_diffusers.data.readers import BACKGROUND_INDEX
from digseg_diffusers.evaluation.runner import evaluate_examples
from digseg_diffusers.evaluation.metrics import ConfusionMatrix, binary_segmentation_metrics
from digseg_diffusers.data.synthetic import SHAPE_CLASSES, generate_scene, split_seeds

# The shipped model: ~36 minutes of training from scratch on a CPU, then 12 000 fine-tuning steps on the `varied`
# rendering (83 min); not converged (benchmarks/quality/demo_fidelity.md). Measured on these 12 scenes when it was
# installed: mIoU 0.722 (0.116 for labelling everything background) and class-agnostic foreground IoU 0.859 on
# average (0.716 / 0.887 on the benchmark's 100 scenes). 12 scenes make a floor, not a ranking: the previous model
# had 0.660 / 0.831 here (0.674 on the 100 scenes), the one before it 0.541 / 0.791 (0.556), an earlier one 0.511 /
# 0.710 (0.533); a mid-run checkpoint of this model's run scored 0.560 here and 0.680 on the 100 scenes.
# The floors pin the level down with a margin, so a retrained demo model can only ship if it is about as good.
MIOU_FLOOR = 0.66
FOREGROUND_IOU_FLOOR = 0.80
# The same 12 seeds drawn in the synthetic world's style-shifted rendering (textures and degradations never used in
# training): 0.582 for the shipped model when this floor was set (0.636 on 100 scenes,
# benchmarks/quality/demo_fidelity_shifted.md; the previous model 0.502 here, 0.500 there). A floor against
# regressions in robustness to rendering.
SHIFTED_MIOU_FLOOR = 0.53


@pytest.fixture(scope="module")
def demo_pipe():
    pipe = DiGSegPipeline.from_pretrained("digseg-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_packaged_folder_is_a_complete_small_safetensors_pipeline():
    path = Path(demo.default_model_path())
    index = json.loads((path / "model_index.json").read_text())
    for component in ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_projection"):
        assert component in index and (path / component).is_dir()
    weights = list(path.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} >= {"unet", "vae", "text_encoder", "text_projection"}
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    total_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    assert total_mb < 40


def test_short_name_resolves_to_the_packaged_model(tmp_path, monkeypatch):
    assert demo.resolve_model_name(demo.DEMO_MODEL_NAME) == demo.default_model_path()
    assert demo.resolve_model_name("org/some-model") == "org/some-model"
    monkeypatch.chdir(tmp_path)
    (tmp_path / demo.DEMO_MODEL_NAME).mkdir()  # a local folder of that name wins
    assert demo.resolve_model_name(demo.DEMO_MODEL_NAME) == demo.DEMO_MODEL_NAME


def test_missing_model_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "demo.py"))
    with pytest.raises(FileNotFoundError, match="demo model is missing"):
        demo.default_model_path()


def test_from_pretrained_by_short_name(demo_pipe):
    pipe = DiGSegPipeline.from_pretrained(demo.DEMO_MODEL_NAME)
    assert pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for name, param in pipe.unet.named_parameters():
        torch.testing.assert_close(param, dict(demo_pipe.unet.named_parameters())[name])
        break


def test_the_comfyui_loader_finds_the_demo_model():
    logic = pytest.importorskip("comfy_nodes.logic")
    assert logic.demo_model_path() == demo.default_model_path()


def _held_out_scenes(num_scenes: int = 12, first: int = 500, style: str = "plain"):
    return [generate_scene(seed, size=64, style=style) for seed in split_seeds("test", num_scenes, seed_offset=split_seeds("test", 0).start + first)]


def test_held_out_miou_floor(demo_pipe):
    """Test-split scenes (never trained on), every class queried, 1 step, 1 ensemble member."""
    scenes = _held_out_scenes()
    examples = [scene.validation_example() for scene in scenes]
    metrics = evaluate_examples(demo_pipe, examples, SHAPE_CLASSES, num_inference_steps=1, ensemble_size=1, batch_size=32).compute()
    everything_background = ConfusionMatrix(len(SHAPE_CLASSES) + 1)
    for example in examples:
        target = np.where(example.label == BACKGROUND_INDEX, len(SHAPE_CLASSES), example.label)
        everything_background.update(np.full_like(target, len(SHAPE_CLASSES)), target)
    assert metrics["mIoU"] >= MIOU_FLOOR, metrics
    assert metrics["mIoU"] > everything_background.compute()["mIoU"]


def test_held_out_foreground_floor(demo_pipe):
    """Class-agnostic: the union of all prompts' labels against the union of all shapes."""
    ious = []
    for position, scene in enumerate(_held_out_scenes()):
        out = demo_pipe(scene.image, list(SHAPE_CLASSES), generator=torch.Generator().manual_seed(position), batch_size=32)
        ious.append(binary_segmentation_metrics(out.label_maps[0] > 0, scene.label > 0)["iou"])
    assert np.mean(ious) >= FOREGROUND_IOU_FLOOR, ious


def test_style_shifted_miou_floor(demo_pipe):
    examples = [scene.validation_example() for scene in _held_out_scenes(style="shifted")]
    metrics = evaluate_examples(demo_pipe, examples, SHAPE_CLASSES, num_inference_steps=1, ensemble_size=1, batch_size=32).compute()
    assert metrics["mIoU"] >= SHIFTED_MIOU_FLOOR, metrics


def test_the_pipeline_call_docstring_example_runs_as_written():
    """The `Examples:` section of `DiGSegPipeline.__call__` (diffusers' `replace_example_docstring`) is a doctest."""
    import doctest

    from digseg_diffusers import pipeline_digseg

    assert pipeline_digseg.EXAMPLE_DOC_STRING.strip() in DiGSegPipeline.__call__.__doc__
    test = doctest.DocTestParser().get_doctest(pipeline_digseg.EXAMPLE_DOC_STRING, {}, "EXAMPLE_DOC_STRING", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.tries >= 7 and runner.failures == 0
