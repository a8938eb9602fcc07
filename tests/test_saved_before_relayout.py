"""Folders saved before the package was re-laid out still load: the module paths a saved model names are kept.

`tests/fixtures/saved_before_relayout/adapter` was saved by `pipe.save_digseg_adapter` (commit 4edba51) from the
pipeline `test_lora_loading._trained_pipe(7)` builds; the embedded demo model was saved by an earlier version still.
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.demo import default_model_path
from digseg_diffusers.testing_utils import assert_close_across_paths, make_tiny_pipeline

from test_lora_loading import _latents, _trained_pipe

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saved_before_relayout"


def test_an_adapter_saved_before_loads_and_gives_its_pipelines_output():
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    pipe = make_tiny_pipeline()
    pipe.load_lora_weights(FIXTURES / "adapter", adapter_name="old")
    assert_close_across_paths(_latents(pipe, image), _latents(_trained_pipe(7), image), what="latents")


def test_the_demo_model_saved_before_loads_with_this_package_and_stock_diffusers():
    folder = default_model_path()
    stub = (Path(folder) / "pipeline_digseg.py").read_text()
    assert "from digseg_diffusers.pipeline_digseg import DiGSegPipeline" in stub
    image = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    outputs = []
    for pipe in (DiGSegPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)):
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe(image, prompt=["circle", "star"], generator=torch.Generator().manual_seed(0)).probabilities[0])
    assert type(pipe).__name__ == "DiGSegPipeline"
    assert_close_across_paths(outputs[1], outputs[0], what="probabilities")


def test_the_demo_models_loader_stubs_are_what_this_version_writes():
    """The shipped folder's stubs say how to install the package today (not `pip install digseg-diffusers`)."""
    import json

    from digseg_diffusers.hub.layout import INSTALL_HINT, _stub_files

    folder = Path(default_model_path())
    stubs = _stub_files(json.loads((folder / "model_index.json").read_text()))
    assert set(stubs) == {"pipeline_digseg.py", "text_projection/digseg_text_projection.py"}
    for relative, text in stubs.items():
        assert (folder / relative).read_text() == text and INSTALL_HINT in text
