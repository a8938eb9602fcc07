"""Saved pipelines in the Hub custom-pipeline layout: stock diffusers loads them, DiGSegPipeline runs no repo code."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from digseg_diffusers import DiGSegPipeline
from digseg_diffusers.hub.layout import INSTALL_HINT, hub_model_index, package_model_index, write_loader_files
from digseg_diffusers.mask_decoder import DiGSegMaskDecoder
from digseg_diffusers.testing_utils import make_tiny_pipeline, write_hub_cache

REPO_ID = "someone/digseg-tiny"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline with a light mask decoder (both custom components), saved, and its reference output."""
    folder = tmp_path_factory.mktemp("layout") / "pipe"
    pipe = make_tiny_pipeline()
    pipe.register_modules(mask_decoder=DiGSegMaskDecoder(latent_channels=4, block_out_channels=(8, 8, 8, 8)).eval())
    pipe.save_pretrained(folder)
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    reference = pipe(image, prompt=["circle"], processing_resolution=32, generator=torch.Generator().manual_seed(0))
    np.save(folder.parent / "image.npy", image)
    np.save(folder.parent / "reference.npy", reference.probabilities[0])
    return folder


def test_saved_folder_has_the_custom_pipeline_layout(saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_digseg", "DiGSegPipeline"]
    assert index["text_projection"] == ["digseg_text_projection", "DiGSegTextProjection"]
    assert index["mask_decoder"] == ["digseg_mask_decoder", "DiGSegMaskDecoder"]
    for stub in ("pipeline_digseg.py", "text_projection/digseg_text_projection.py", "mask_decoder/digseg_mask_decoder.py"):
        text = (saved / stub).read_text()
        assert "from digseg_diffusers." in text and INSTALL_HINT in text
        assert not any(line.startswith("from .") for line in text.splitlines())  # loaded standalone: no relative import
    # diffusers' Hub download accepts every component entry (it refuses modules that are neither files nor libraries).
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    files = [str(p.relative_to(saved)).replace(os.sep, "/") for p in saved.rglob("*") if p.is_file()]
    custom, _ = _get_custom_components_and_folders(REPO_ID, index, files)
    assert custom == {"text_projection": "digseg_text_projection", "mask_decoder": "digseg_mask_decoder"}


def test_index_conversion_round_trips():
    old = {"_class_name": "DiGSegPipeline", "text_projection": ["digseg_diffusers.text_projection", "DiGSegTextProjection"],
           "mask_decoder": [None, None], "unet": ["diffusers", "UNet2DConditionModel"]}  # fmt: skip
    new = hub_model_index(old)
    assert new["mask_decoder"] == [None, None] and new["unet"] == old["unet"]
    assert package_model_index(new) == old
    assert package_model_index(new, components=False)["text_projection"] == new["text_projection"]


def test_digseg_pipeline_loads_without_running_repo_code(saved, monkeypatch):
    import diffusers.pipelines.pipeline_loading_utils as loading

    def refuse(*args, **kwargs):
        raise AssertionError("DiGSegPipeline.from_pretrained imported code from the saved folder")

    monkeypatch.setattr(loading, "get_class_from_dynamic_module", refuse)
    pipe = DiGSegPipeline.from_pretrained(saved)
    assert type(pipe.text_projection).__module__ == "digseg_diffusers.text_projection"
    assert type(pipe.mask_decoder).__module__ == "digseg_diffusers.mask_decoder"
    image = np.load(saved.parent / "image.npy")
    out = pipe(image, prompt=["circle"], processing_resolution=32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out.probabilities[0], np.load(saved.parent / "reference.npy"), atol=1e-5)


def test_digseg_pipeline_loads_a_hub_repo_offline(saved, tmp_path, monkeypatch):
    """By `org/name` id from a cache with the repo's file listing: the same checks diffusers runs online."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    write_hub_cache(cache, REPO_ID, saved, with_tree=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = DiGSegPipeline.from_pretrained(REPO_ID, cache_dir=str(cache))
    assert isinstance(pipe, DiGSegPipeline) and pipe.mask_decoder is not None


def test_old_layout_still_loads_and_upgrades(saved, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    for stub in old.rglob("digseg*.py"):
        stub.unlink()
    (old / "pipeline_digseg.py").unlink()
    index = package_model_index(json.loads((old / "model_index.json").read_text()))
    (old / "model_index.json").write_text(json.dumps(index))
    assert isinstance(DiGSegPipeline.from_pretrained(old), DiGSegPipeline)
    write_loader_files(old)
    assert json.loads((old / "model_index.json").read_text())["_class_name"] == ["pipeline_digseg", "DiGSegPipeline"]
    assert (old / "text_projection" / "digseg_text_projection.py").is_file()
    with pytest.raises(ValueError, match="not a DiGSeg pipeline"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        write_loader_files(tmp_path / "other")


STOCK_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    import numpy as np, torch
    from diffusers import DiffusionPipeline

    folder, repo_id, commit = sys.argv[1:4]
    image = np.load(sys.argv[4])
    results = {}

    def run(pipe):
        out = pipe(image, prompt=["circle"], processing_resolution=32, generator=torch.Generator().manual_seed(0))
        return out.probabilities[0].tolist()

    try:
        DiffusionPipeline.from_pretrained(folder)
    except ValueError as error:
        results["untrusted"] = str(error)
    results["folder"] = run(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True))
    results["custom_pipeline"] = run(
        DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_digseg", trust_remote_code=True)
    )
    # diffusers asks the Hub for the commit of a remote custom pipeline even when the files are cached (it
    # calls `model_info`, which fails offline): answer that one call, everything else comes from the cache.
    import diffusers.utils.dynamic_modules_utils as dynamic
    dynamic.model_info = lambda *args, **kwargs: types.SimpleNamespace(sha=commit)
    pipe = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    results["hub"] = run(pipe)
    results["classes"] = [type(pipe).__name__, type(pipe.text_projection).__name__, type(pipe.mask_decoder).__name__]
    print(json.dumps(results))
    """
)


def _run(script, *args, tmp_path, block_package=False):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"))
    prefix = "import sys; sys.modules['digseg_diffusers'] = None\n" if block_package else ""
    return subprocess.run(
        [sys.executable, "-c", prefix + script, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_stock_diffusers_loads_folder_and_hub_repo(saved, tmp_path):
    from digseg_diffusers.testing_utils import HUB_CACHE_COMMIT

    write_hub_cache(tmp_path / "hub", REPO_ID, saved, with_tree=True)
    result = _run(STOCK_SCRIPT, saved, REPO_ID, HUB_CACHE_COMMIT, saved.parent / "image.npy", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert "trust_remote_code=True" in results["untrusted"]
    assert results["classes"] == ["DiGSegPipeline", "DiGSegTextProjection", "DiGSegMaskDecoder"]
    reference = np.load(saved.parent / "reference.npy")
    for key in ("folder", "custom_pipeline", "hub"):
        np.testing.assert_allclose(np.array(results[key]), reference, atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_without_the_package_the_error_says_what_to_install(saved, tmp_path):
    script = "import sys\nfrom diffusers import DiffusionPipeline\nDiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
    result = _run(script, saved, tmp_path=tmp_path, block_package=True)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: This model is a DiGSeg pipeline") and INSTALL_HINT in last_line
