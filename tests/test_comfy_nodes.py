"""Tests of the ComfyUI nodes without ComfyUI: the plain logic, and the node classes over a minimal stand-in API."""

import asyncio
import importlib
import json
import logging
import math
import os
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from comfy_nodes import logic  # noqa: E402
from digseg_diffusers.hub.layout import MODEL_INDEX_NAME  # noqa: E402
from digseg_diffusers.testing_utils import (  # noqa: E402
    assert_close_across_paths,
    assert_label_maps_match_across_paths,
    make_tiny_pipeline,
)

COMFY_MODULES = ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils", "folder_paths", "comfy_api")


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline(seed=0)


def comfy_images(batch=2, height=32, width=40, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, channels, generator=generator)


# ------------------------------------------------------------------------------------------------ import safety


def test_package_imports_without_comfyui():
    import comfy_nodes

    assert callable(comfy_nodes.comfy_entrypoint)
    assert not hasattr(comfy_nodes, "NODE_CLASS_MAPPINGS")  # V1 mappings would shadow the V3 entry point
    assert not any(name in sys.modules for name in COMFY_MODULES)


def test_nodes_module_needs_comfyui():
    sys.modules.pop("comfy_nodes.nodes", None)
    with pytest.raises(ImportError):
        importlib.import_module("comfy_nodes.nodes")


# ------------------------------------------------------------------------------------------------ prompts, tensors


def test_comfy_images_to_pipeline_layout():
    images = comfy_images(batch=2, height=5, width=7)
    pixels = logic.comfy_images_to_pipeline(images)
    assert pixels.shape == (2, 3, 5, 7) and pixels.dtype == torch.float32
    assert torch.equal(pixels[1, 2], images[1, :, :, 2])


def test_comfy_images_to_pipeline_channels_and_range():
    rgba = comfy_images(batch=1, height=4, width=4, channels=4)
    assert torch.equal(logic.comfy_images_to_pipeline(rgba), logic.comfy_images_to_pipeline(rgba[..., :3]))
    grey = comfy_images(batch=1, height=4, width=4, channels=1)
    out = logic.comfy_images_to_pipeline(grey)
    assert out.shape == (1, 3, 4, 4) and torch.equal(out[0, 0], out[0, 2])
    wild = torch.tensor([[[[1.2, -0.1, float("nan")]]]])
    assert logic.comfy_images_to_pipeline(wild).flatten().tolist() == [1.0, 0.0, 0.0]
    assert logic.comfy_images_to_pipeline(comfy_images(batch=1)[0]).shape[0] == 1  # [H, W, C] without batch


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 8, 8), torch.rand(8, 8), "image"])
def test_comfy_images_to_pipeline_rejects_bad_layouts(bad):
    with pytest.raises(ValueError, match="IMAGE"):
        logic.comfy_images_to_pipeline(bad)


# ------------------------------------------------------------------------------------------------ segmentation


def test_segment_batch_alignment_and_layouts(pipe):
    images = comfy_images(batch=2, height=32, width=40)
    prompts = ["circle", "star", "heart"]
    result = logic.segment(pipe, images, prompts, processing_resolution=32, mask_threshold=0.5, seed=3)
    assert result.masks.shape == (2, 3, 32, 40) and result.probabilities.shape == (2, 3, 32, 40)
    assert result.label_maps.shape == (2, 32, 40) and result.label_maps.dtype == torch.int64
    assert result.prompts == prompts and result.num_images == 2 and result.num_prompts == 3
    assert set(result.masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(result.masks, (result.probabilities > 0.5).float())
    assert 0 <= int(result.label_maps.min()) and int(result.label_maps.max()) <= 3

    batch = result.mask_batch()  # ComfyUI MASK [B*K, H, W], image-major
    assert batch.shape == (6, 32, 40) and batch.dtype == torch.float32
    for b in range(2):
        for k in range(3):
            assert torch.equal(batch[b * 3 + k], result.masks[b, k])
    label_mask = result.label_map_mask()
    assert label_mask.shape == (2, 32, 40) and label_mask.dtype == torch.float32
    assert torch.equal(label_mask.long(), result.label_maps)


def test_segment_matches_the_pipeline_and_is_seeded(pipe):
    images = comfy_images(batch=1, height=32, width=32, seed=1)
    kwargs = dict(processing_resolution=32, ensemble_size=2, num_inference_steps=2, seed=7)
    first = logic.segment(pipe, images, ["star", "ring"], **kwargs)
    direct = pipe(
        images.permute(0, 3, 1, 2),
        prompt=["star", "ring"],
        num_inference_steps=2,
        ensemble_size=2,
        processing_resolution=32,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    # The node feeds a [B,H,W,C] tensor permuted to channels-first (another memory layout: another kernel order),
    # seeded by a CPU generator: the same result up to float32 rounding.
    assert_close_across_paths(first.probabilities[0], direct.probabilities[0], what="probabilities")
    assert_label_maps_match_across_paths(
        first.label_maps[0], direct.label_maps[0], direct.probabilities[0], pipe.config.default_mask_threshold
    )
    other_seed = logic.segment(pipe, images, ["star", "ring"], **{**kwargs, "seed": 8})
    assert float((first.probabilities - other_seed.probabilities).abs().max()) > 1e-3  # the seed matters


def test_segment_reports_progress_and_cancels(pipe):
    images = comfy_images(batch=1, height=32, width=32)
    calls = []
    logic.segment(
        pipe, images, ["a", "b", "c"], processing_resolution=32, num_inference_steps=2, batch_size=2,
        progress_callback=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert calls == [(i, 4) for i in range(1, 5)]  # 2 chunks x 2 steps

    class Interrupted(Exception):
        pass

    def interrupt(done, total):
        if done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        logic.segment(
            pipe, images, ["a", "b", "c"], processing_resolution=32, num_inference_steps=2, batch_size=2,
            progress_callback=interrupt,
        )  # fmt: skip


def test_segment_nothing_found_gives_zero_masks(pipe):
    images = comfy_images(batch=2, height=32, width=32)
    result = logic.segment(pipe, images, ["zebra", "unicorn"], processing_resolution=32, mask_threshold=1.0)
    assert result.mask_batch().shape == (4, 32, 32)
    assert float(result.masks.abs().sum()) == 0.0


def test_segment_without_prompts_or_images(pipe, caplog):
    images = comfy_images(batch=3, height=16, width=24)
    result = logic.segment(pipe, images, [])
    assert result.masks.shape == (3, 0, 16, 24) and result.mask_batch().shape == (0, 16, 24)
    assert result.label_maps.shape == (3, 16, 24) and int(result.label_maps.abs().sum()) == 0
    assert "no prompts" in caplog.text
    none = logic.segment(pipe, torch.zeros(0, 16, 24, 3), ["cat"])
    assert none.mask_batch().shape == (0, 16, 24) and none.label_maps.shape == (0, 16, 24)


def test_segment_background_threshold_negative_means_mask_threshold(pipe):
    images = comfy_images(batch=1, height=32, width=32)
    common = dict(processing_resolution=32, mask_threshold=0.4, seed=0)
    default = logic.segment(pipe, images, ["a", "b"], background_threshold=-1.0, **common)
    explicit = logic.segment(pipe, images, ["a", "b"], background_threshold=0.4, **common)
    assert torch.equal(default.label_maps, explicit.label_maps)


def test_segment_uses_the_model_defaults_like_every_other_front_end():
    # A model calibrated to another threshold (the demo model's is 0.5) and 2 default steps: the node's
    # "model default" (-1 / 0) must segment exactly as a plain pipeline call without those arguments does.
    pipe = make_tiny_pipeline(seed=0, default_mask_threshold=0.45, default_denoising_steps=2)
    images = comfy_images(batch=1, height=32, width=32)
    steps = []
    result = logic.segment(
        pipe, images, ["a", "b"], processing_resolution=32, num_inference_steps=0, mask_threshold=-1.0, seed=0,
        progress_callback=lambda done, total: steps.append(total),
    )
    assert steps[-1] == 2  # the model's 2 steps (one chunk)
    assert torch.equal(result.masks, (result.probabilities > 0.45).float())
    plain = pipe(images.permute(0, 3, 1, 2), ["a", "b"], processing_resolution=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert_close_across_paths(result.probabilities[0], plain.probabilities[0], what="probabilities")
    assert pipe.resolve_call_defaults() == {
        "num_inference_steps": 2, "processing_resolution": pipe.config.default_processing_resolution,
        "mask_threshold": 0.45, "background_threshold": 0.45,
    }  # fmt: skip
    assert pipe.resolve_call_defaults(3, 0, 0.6, None)["background_threshold"] == 0.6


def test_pipeline_output_to_result_checks_shapes():
    output = SimpleNamespace(
        probabilities=[torch.zeros(2, 4, 4)],
        masks=[torch.zeros(2, 4, 4, dtype=torch.bool)],
        label_maps=[torch.zeros(4, 4)],
    )
    result = logic.pipeline_output_to_result(output, ["a", "b"], 1, 4, 4)
    assert result.masks.shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="for 2 images"):
        logic.pipeline_output_to_result(output, ["a", "b"], 2, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        logic.pipeline_output_to_result(output, ["a", "b", "c"], 1, 4, 4)


def test_overlay_batch_layout():
    images = comfy_images(batch=2, height=6, width=5)
    labels = torch.zeros(2, 6, 5, dtype=torch.int64)
    labels[1, :3] = 2
    out = logic.overlay_batch(images, labels, num_classes=2)
    assert out.shape == (2, 6, 5, 3) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    quantised = (images * 255).round() / 255
    assert torch.allclose(out[0], quantised[0])  # background untouched
    assert not torch.allclose(out[1, :3], quantised[1, :3])
    with pytest.raises(ValueError, match="do not match"):
        logic.overlay_batch(images, labels[:1], num_classes=2)


# ------------------------------------------------------------------------------------------------ pick mask


def make_result():
    masks = torch.zeros(2, 3, 4, 4)
    masks[:, 0, 0] = 1
    masks[:, 1, :2] = 1  # overlaps prompt 0 in row 0
    probabilities = masks * 0.9
    labels = torch.zeros(2, 4, 4, dtype=torch.int64)
    labels[:, 0] = 1
    labels[:, 1] = 2
    return logic.SegmentationResult(masks, probabilities, labels, ["cat", "Red Car", "sky"])


@pytest.mark.parametrize("select, index", [("cat", 0), ("red car", 1), ("Red Car", 1), ("2", 2), ("-1", 2), (1, 1)])
def test_select_prompt_index(select, index):
    assert logic.select_prompt_index(["cat", "Red Car", "sky"], select) == index


def test_select_prompt_index_errors_and_unknown_names():
    assert logic.select_prompt_index(["cat"], "dog") is None
    with pytest.raises(ValueError, match="out of range"):
        logic.select_prompt_index(["cat", "dog"], "2")
    with pytest.raises(ValueError, match="empty"):
        logic.select_prompt_index(["cat"], "  ")


def test_pick_mask_kinds():
    result = make_result()
    mask = logic.pick_mask(result, "Red Car", "mask")
    assert mask.shape == (2, 4, 4) and torch.equal(mask, result.masks[:, 1])
    assert torch.equal(logic.pick_mask(result, 1, "probability"), result.probabilities[:, 1])
    region = logic.pick_mask(result, "red car", "region")
    assert torch.equal(region, (result.label_maps == 2).float())
    assert float((region * logic.pick_mask(result, "cat", "region")).sum()) == 0.0  # regions are exclusive
    with pytest.raises(ValueError, match="kind"):
        logic.pick_mask(result, "cat", "outline")


def test_pick_mask_unknown_name_gives_empty_mask_with_batch_size():
    result = make_result()
    mask = logic.pick_mask(result, "dog", "mask")
    assert mask.shape == (2, 4, 4) and float(mask.sum()) == 0.0
    empty = logic.empty_result(3, 4, 5)
    assert logic.pick_mask(empty, "cat").shape == (3, 4, 5)


# ------------------------------------------------------------------------------------------------ models


def make_model_folder(root: Path, name: str, marker: str = MODEL_INDEX_NAME) -> Path:
    folder = root.joinpath(*name.split("/"))
    folder.mkdir(parents=True)
    (folder / marker).write_text("{}")
    return folder


def test_list_model_folders_and_choices(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    make_model_folder(first, "tiny")
    make_model_folder(first, "org/model")
    make_model_folder(second, "other")
    (first / "not-a-model").mkdir()
    make_model_folder(first, "x/y/too-deep")
    make_model_folder(second, "proposer", marker=logic.PROPOSER_CONFIG)
    paths = [str(first), str(second), str(tmp_path / "missing")]
    assert logic.list_model_folders(paths) == ["org/model", "other", "tiny"]
    assert logic.proposer_choices(paths) == ["proposer"]

    monkeypatch.setattr(logic, "demo_model_path", lambda: None)
    assert logic.model_choices(paths) == ["org/model", "other", "tiny"]
    assert logic.model_choices([]) == [logic.NO_MODEL_CHOICE]
    assert logic.proposer_choices([]) == [logic.NO_PROPOSER_CHOICE]
    monkeypatch.setattr(logic, "demo_model_path", lambda: "/somewhere/demo")
    assert logic.model_choices(paths)[0] == logic.DEMO_CHOICE


def _demo_missing():
    raise FileNotFoundError("The embedded demo model is missing: /pkg/models/demo has no model_index.json.")


def test_a_missing_demo_model_leaves_the_list_and_names_itself_when_picked(monkeypatch):
    from digseg_diffusers.demo import default_model_path

    assert logic.demo_model_path() == default_model_path()
    monkeypatch.setattr(logic, "default_model_path", _demo_missing)  # an installation without the demo folder
    assert logic.demo_model_path() is None
    assert logic.DEMO_CHOICE not in logic.model_choices([])
    with pytest.raises(ValueError, match="demo model is missing"):  # a saved workflow that still names it
        logic.resolve_model_source(logic.DEMO_CHOICE, "", [])


def test_resolve_model_source(tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path, "org/model")
    paths = [str(tmp_path)]
    assert logic.resolve_model_source("org/model", "", paths) == ("local", str(folder))
    assert logic.resolve_model_source("org/model", str(folder), paths) == ("local", str(folder))
    assert logic.resolve_model_source("anything", "someone/digseg-sd2", paths) == ("hub", "someone/digseg-sd2")
    assert logic.resolve_model_source("x", "org/model", paths) == ("local", str(folder))  # local name beats hub id
    with pytest.raises(ValueError, match="neither an existing folder"):
        logic.resolve_model_source("x", "not a hub id", paths)
    with pytest.raises(ValueError, match="not found"):
        logic.resolve_model_source("missing", "", paths)
    with pytest.raises(ValueError, match="No model selected"):
        logic.resolve_model_source(logic.NO_MODEL_CHOICE, "", paths)
    from digseg_diffusers.demo import default_model_path

    assert logic.resolve_model_source(logic.DEMO_CHOICE, "", paths) == ("local", default_model_path())


def test_resolve_adapter_path(tmp_path):
    model = make_model_folder(tmp_path, "model")
    (model / "my-adapter").mkdir()
    (tmp_path / "shared-adapter").mkdir()
    assert logic.resolve_adapter_path("", [str(tmp_path)]) is None
    assert logic.resolve_adapter_path("my-adapter", [str(tmp_path)], str(model)) == str(model / "my-adapter")
    assert logic.resolve_adapter_path("shared-adapter", [str(tmp_path)], str(model)) == str(
        tmp_path / "shared-adapter"
    )
    assert logic.resolve_adapter_path(str(tmp_path / "shared-adapter"), []) == str(tmp_path / "shared-adapter")
    with pytest.raises(ValueError, match="not found"):
        logic.resolve_adapter_path("nope", [str(tmp_path)], str(model))


def test_torch_dtype_for():
    assert logic.torch_dtype_for("fp16") is torch.float16
    assert logic.torch_dtype_for("bf16") is torch.bfloat16
    assert logic.torch_dtype_for("auto", torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        logic.torch_dtype_for("int8")


class FakePipelineClass:
    calls = []
    error = None

    def __init__(self):
        self.adapters = []
        self.moved_to = None
        self.progress_bar = {}

    @classmethod
    def from_pretrained(cls, location, **kwargs):
        cls.calls.append((location, kwargs))
        if cls.error is not None:
            raise cls.error
        return cls()

    def to(self, *args, **kwargs):
        self.moved_to = kwargs.get("dtype")
        return self

    def load_digseg_adapter(self, path):
        self.adapters.append(path)

    def set_progress_bar_config(self, **kwargs):
        self.progress_bar.update(kwargs)


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


def test_load_pipeline_hub_offline_message(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    FakePipelineClass.calls = []
    monkeypatch.setattr(logic, "hub_reachable", lambda: True)
    # transformers / diffusers wrap huggingface_hub's typed error in an OSError of their own
    FakePipelineClass.error = _raised_from(OSError("Cannot load model"), LocalEntryNotFoundError("not cached"))
    with pytest.raises(RuntimeError) as error:
        logic.load_pipeline("hub", "someone/digseg", torch.float16, pipeline_class=FakePipelineClass)
    assert (
        "someone/digseg" in str(error.value) and "offline" in str(error.value) and "models/digseg" in str(error.value)
    )
    assert FakePipelineClass.calls[-1][1]["local_files_only"] is False  # reachable: the Hub is asked

    monkeypatch.setattr(logic, "hub_reachable", lambda: False)  # unreachable: only the local cache is tried
    FakePipelineClass.error = FileNotFoundError("not in cache")
    with pytest.raises(RuntimeError, match="offline"):
        logic.load_pipeline("hub", "someone/digseg", torch.float16, pipeline_class=FakePipelineClass)
    assert FakePipelineClass.calls[-1][1]["local_files_only"] is True
    FakePipelineClass.error = None
    assert isinstance(
        logic.load_pipeline("hub", "someone/cached", torch.float16, pipeline_class=FakePipelineClass),
        FakePipelineClass,
    )

    monkeypatch.setattr(logic, "hub_reachable", lambda: True)
    for broken in (ValueError("model_index.json is malformed"), OSError("malformed: could not connect the pieces")):
        FakePipelineClass.error = broken  # no network error in the chain: the words in it do not matter
        with pytest.raises(RuntimeError, match="malformed") as error:
            logic.load_pipeline("hub", "someone/digseg", torch.float16, pipeline_class=FakePipelineClass)
        assert "offline" not in str(error.value)

    # The real pipeline class in huggingface_hub's offline mode: no request, the one clear message.
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not download.*offline.*models/digseg"):
        logic.load_pipeline("hub", "digseg-test/not-cached-anywhere", torch.float32)


def test_load_pipeline_local_and_adapter():
    FakePipelineClass.calls = []
    FakePipelineClass.error = None
    loaded = logic.load_pipeline("local", "/models/x", torch.bfloat16, pipeline_class=FakePipelineClass)
    location, kwargs = FakePipelineClass.calls[-1]
    assert location == "/models/x" and kwargs == {"local_files_only": True, "dtype": torch.bfloat16}
    assert loaded.moved_to is None and loaded.adapters == []
    assert loaded.progress_bar == {"disable": True}  # ComfyUI's progress bar reports instead
    loaded = logic.load_pipeline("local", "/models/x", torch.float16, "/adapters/a", pipeline_class=FakePipelineClass)
    assert loaded.adapters == ["/adapters/a"] and loaded.moved_to is torch.float16


def test_model_cache_reuses_and_evicts():
    evicted, loads = [], []
    cache = logic.ModelCache(max_entries=2, on_evict=evicted.append)

    def loader(name):
        return lambda: loads.append(name) or name

    assert cache.get_or_load(("a",), loader("a")) == "a"
    assert cache.get_or_load(("a",), loader("a-again")) == "a"  # cached, not reloaded
    cache.get_or_load(("b",), loader("b"))
    cache.get_or_load(("a",), loader("a-again"))  # refreshes "a"
    cache.get_or_load(("c",), loader("c"))  # evicts the least recently used: "b"
    assert loads == ["a", "b", "c"] and evicted == ["b"]
    assert ("a",) in cache and ("c",) in cache and len(cache) == 2
    cache.clear()
    assert sorted(evicted) == ["a", "b", "c"] and len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        logic.ModelCache(max_entries=0)


def test_cache_key_separates_precision_and_adapter(tmp_path):
    folder = make_model_folder(tmp_path, "m")
    base = logic.cache_key("local", str(folder), torch.float16, None)
    assert base == logic.cache_key("local", str(folder), torch.float16, None)
    assert base != logic.cache_key("local", str(folder), torch.float32, None)
    (tmp_path / "ad").mkdir()
    assert base != logic.cache_key("local", str(folder), torch.float16, str(tmp_path / "ad"))
    assert logic.cache_key("hub", "o/n", torch.float16, None)[1] == "o/n"


# ------------------------------------------------------------------------------------------------ class proposal


def test_resolve_vocabulary():
    names, prompts = logic.resolve_vocabulary("custom", "cat, dog\ncat")
    assert names == prompts == ["cat", "dog"]
    with pytest.raises(ValueError, match="custom_classes"):
        logic.resolve_vocabulary("custom", " ")
    names, prompts = logic.resolve_vocabulary("a-847", "")
    assert len(names) == len(prompts) == 847
    assert "building, edifice" in names and prompts[names.index("building, edifice")] == "building"
    assert not any("," in p for p in prompts)
    assert "ade20k-150" in logic.vocabulary_choices() and logic.vocabulary_choices()[-1] == logic.CUSTOM_VOCABULARY


def test_propose_classes_union_in_order():
    class FakeProposer:
        def score(self, pixels, names, **settings):
            self.seen = (tuple(pixels.shape), list(names), settings)
            return SimpleNamespace(selected=[[2, 0], [1, 2]])

    proposer = FakeProposer()
    classes = logic.propose_classes(
        proposer, comfy_images(batch=2, height=8, width=8), ["cat", "dog", "sky, heaven"], ["cat", "dog", "sky"],
        global_threshold=0.2, patch_threshold=-1, top_k=0,
    )  # fmt: skip
    assert classes == ["sky", "cat", "dog"]
    # the node's settings go with the call (negative = no patches, 0 = no cap); nothing is set on the proposer
    assert proposer.seen == (
        (2, 3, 8, 8), ["cat", "dog", "sky, heaven"], {"global_threshold": 0.2, "patch_threshold": math.inf, "top_k": 3}
    )  # fmt: skip
    assert vars(proposer).keys() == {"seen"}
    assert logic.propose_classes(proposer, torch.zeros(0, 8, 8, 3), ["cat"]) == []


def make_tiny_proposer(**settings):
    from digseg_diffusers.testing_utils import make_tiny_class_proposer

    return make_tiny_class_proposer(**settings)


def test_propose_classes_with_a_real_proposer():
    """The shared (cached) proposer keeps its own settings; the node's give what a proposer made with them gives."""
    proposer = make_tiny_proposer(top_k=1)
    saved_settings = proposer.proposer_config()
    images, names = comfy_images(batch=2, height=20, width=24), ["cat", "dog", "bird"]
    for settings in [
        {"global_threshold": 1.0, "patch_threshold": -1, "top_k": 0},
        {"global_threshold": -1.0, "patch_threshold": -1, "top_k": 2},
        {"global_threshold": 0.0, "patch_threshold": 0.0, "top_k": 0},
    ]:
        classes = logic.propose_classes(proposer, images, names, **settings)
        configured = logic.DiGSegClassProposer(
            proposer.clip_model,
            proposer.tokenizer,
            global_threshold=settings["global_threshold"],
            patch_threshold=None if settings["patch_threshold"] < 0 else settings["patch_threshold"],
            top_k=settings["top_k"] or None,
        )
        per_image = configured.propose(logic.comfy_images_to_pipeline(images), names)
        assert classes == list(dict.fromkeys(name for proposals in per_image for name in proposals)), settings
        assert proposer.proposer_config() == saved_settings
    # Nothing clears a cosine of 1.0, so each image keeps its single best class (min_classes = 1).
    best = logic.propose_classes(proposer, images, names, global_threshold=1.0, patch_threshold=-1, top_k=0)
    assert 1 <= len(best) <= 2 and set(best) <= set(names)
    everything = logic.propose_classes(proposer, images, names, global_threshold=-1.0, patch_threshold=-1, top_k=0)
    assert sorted(everything) == sorted(names)  # every cosine clears -1; the proposer's own top_k=1 is not applied


# ------------------------------------------------------------------------------------------------ the nodes


class _FakeIO:
    """Just enough of `comfy_api.v0_0_2.io` to define and call the nodes."""

    class ComfyNode:
        pass

    class Schema:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class NodeOutput:
        def __init__(self, *args, **kwargs):
            self.args = args

    @staticmethod
    def _make_type(io_type):
        class Socket:
            def __init__(self, *args, **kwargs):
                self.io_type, self.args, self.kwargs = io_type, args, kwargs
                self.id = args[0] if args else kwargs.get("display_name")

        return type(io_type, (), {"io_type": io_type, "Input": Socket, "Output": Socket})

    @classmethod
    def Custom(cls, io_type):  # noqa: N802 - mirrors ComfyUI's name
        return cls._make_type(io_type)


for _name, _type in [
    ("Image", "IMAGE"),
    ("Mask", "MASK"),
    ("String", "STRING"),
    ("Int", "INT"),
    ("Float", "FLOAT"),
    ("Combo", "COMBO"),
]:
    setattr(_FakeIO, _name, _FakeIO._make_type(_type))


class FakeComfy:
    """Stand-ins for comfy.model_management / comfy.utils / comfy.model_patcher / folder_paths, recording calls."""

    def __init__(self, models_dir):
        self.loaded, self.progress, self.empty_cache_calls, self.interrupt_at = [], [], 0, None
        self.folders = {}
        fake = self

        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.text_encoder_device = lambda: torch.device("cpu")
        mm.text_encoder_offload_device = lambda: torch.device("cpu")
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.should_use_fp16 = lambda *a, **k: False
        mm.should_use_bf16 = lambda *a, **k: False
        mm.dtype_size = lambda dtype: torch.empty(0, dtype=dtype).element_size()
        mm.load_models_gpu = lambda models, **kwargs: fake.loaded.append((models, kwargs))

        def soft_empty_cache(force=False):
            fake.empty_cache_calls += 1

        mm.soft_empty_cache = soft_empty_cache

        class InterruptProcessingException(Exception):
            pass

        mm.InterruptProcessingException = InterruptProcessingException

        def throw_exception_if_processing_interrupted():
            if fake.interrupt_at is not None and len(fake.progress) >= fake.interrupt_at:
                raise InterruptProcessingException()

        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((value, total))

        utils.ProgressBar = ProgressBar

        patcher = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device
                self.detached = False

            def detach(self, unpatch_all=True):
                self.detached = True

        patcher.ModelPatcher = ModelPatcher

        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(models_dir)

        def add_model_folder_path(name, path, is_default=False):
            fake.folders.setdefault(name, [])
            if path not in fake.folders[name]:
                fake.folders[name].append(path)

        folder_paths.add_model_folder_path = add_model_folder_path
        folder_paths.get_folder_paths = lambda name: list(fake.folders.get(name, []))

        api = types.ModuleType("comfy_api.v0_0_2")
        api.io = _FakeIO

        class ComfyExtension:
            pass

        api.ComfyExtension = ComfyExtension
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher
        self.modules = {
            "comfy": comfy,
            "comfy.model_management": mm,
            "comfy.utils": utils,
            "comfy.model_patcher": patcher,
            "folder_paths": folder_paths,
            "comfy_api": types.ModuleType("comfy_api"),
            "comfy_api.v0_0_2": api,
        }


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = FakeComfy(tmp_path / "models")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "comfy_nodes.nodes", raising=False)
    nodes = importlib.import_module("comfy_nodes.nodes")
    yield fake, nodes
    sys.modules.pop("comfy_nodes.nodes", None)


def test_entrypoint_lists_uniquely_named_nodes(comfy):
    fake, nodes = comfy
    import comfy_nodes

    extension = asyncio.run(comfy_nodes.comfy_entrypoint())
    node_classes = asyncio.run(extension.get_node_list())
    schemas = [cls.define_schema() for cls in node_classes]
    ids = [schema.node_id for schema in schemas]
    assert ids == ["DiGSegModelLoader", "DiGSegSegment", "DiGSegPickMask", "DiGSegClassProposal"]
    assert all(schema.category == "DiGSeg" for schema in schemas)
    # The digseg model folder is registered with ComfyUI's folder registry (extra_model_paths.yaml adds to it).
    assert fake.folders["digseg"] == [os.path.join(str(fake.modules["folder_paths"].models_dir), "digseg")]
    segment_outputs = [o.io_type for o in schemas[1].outputs]
    assert segment_outputs == ["MASK", "MASK", "IMAGE", "DIGSEG_SEGMENTATION"]


@pytest.mark.slow
def test_loader_and_segment_nodes_end_to_end(comfy, tmp_path):
    fake, nodes = comfy
    models = Path(fake.modules["folder_paths"].models_dir) / "digseg"
    make_tiny_pipeline(seed=0).save_pretrained(str(models / "tiny"))
    loader_schema = nodes.DiGSegModelLoader.define_schema()
    assert "tiny" in loader_schema.inputs[0].kwargs["options"]

    loaded = nodes.DiGSegModelLoader.execute(model="tiny", precision="auto").args[0]
    again = nodes.DiGSegModelLoader.execute(model="tiny", precision="auto").args[0]
    assert again is loaded  # cached: no reload on the next run
    assert loaded.dtype == torch.float32  # "auto" on a device without fp16/bf16 support
    assert loaded.patcher.load_device == torch.device("cpu")

    images = comfy_images(batch=2, height=32, width=32)
    outputs = nodes.DiGSegSegment.execute(
        digseg_model=loaded, image=images, prompts="star, ring\nheart", steps=1, ensemble_size=2,
        processing_resolution=32, mask_threshold=0.5, background_threshold=-1.0, seed=0, batch_size=4,
    ).args  # fmt: skip
    masks, label_map, overlay, segmentation = outputs
    assert masks.shape == (6, 32, 32) and label_map.shape == (2, 32, 32) and overlay.shape == (2, 32, 32, 3)
    assert segmentation.prompts == ["star", "ring", "heart"]
    assert fake.loaded and fake.loaded[-1][0] == [loaded.patcher] and fake.loaded[-1][1]["force_full_load"] is True
    assert fake.progress[-1] == (3, 3)  # 12 rows / batch 4 = 3 U-Net calls
    assert fake.empty_cache_calls >= 1

    star = nodes.DiGSegPickMask.execute(segmentation=segmentation, select="star", kind="mask").args[0]
    assert torch.equal(star, masks[0::3])

    fake.interrupt_at = 1
    with pytest.raises(fake.modules["comfy.model_management"].InterruptProcessingException):
        nodes.DiGSegSegment.execute(
            digseg_model=loaded, image=images, prompts="star, ring, heart", steps=1, ensemble_size=2,
            processing_resolution=32, mask_threshold=0.5, background_threshold=-1.0, seed=0, batch_size=4,
        )  # fmt: skip

    other = nodes.DiGSegModelLoader.execute(model="tiny", precision="bf16").args[0]
    assert other is not loaded and other.dtype == torch.bfloat16
    nodes.DiGSegModelLoader.execute(model="tiny", precision="fp16")  # a third model: the oldest is released
    assert loaded.patcher.detached and not other.patcher.detached


def test_proposal_node(comfy):
    fake, nodes = comfy
    folder = Path(fake.modules["folder_paths"].models_dir) / "digseg" / "tiny-proposer"
    make_tiny_proposer().save_pretrained(str(folder))
    schema = nodes.DiGSegClassProposal.define_schema()
    assert schema.inputs[1].kwargs["options"] == ["tiny-proposer"]
    classes = nodes.DiGSegClassProposal.execute(
        image=comfy_images(batch=1), proposer="tiny-proposer", vocabulary="custom", global_threshold=-1.0,
        patch_threshold=-1.0, top_k=2, custom_classes="cat, dog, bird",
    ).args[0]  # fmt: skip
    assert isinstance(classes, str) and len(classes.split("\n")) == 2
    assert set(classes.split("\n")) <= {"cat", "dog", "bird"}
    assert logic.parse_prompts(classes) == classes.split("\n")  # chains into Segment unchanged


# ------------------------------------------------------------------------------------------------ as ComfyUI runs them


class ComfyPromptWorker:
    """Runs prompts the way ComfyUI's executor does (`PromptExecutor.execute_async` in ComfyUI's execution.py).

    Every prompt runs on ComfyUI's one prompt-worker thread, the whole of it inside ``torch.inference_mode()``: the
    weights the loader node loads are inference tensors (no version counter, no autograd), and so is everything the
    nodes compute. ComfyUI keeps node outputs between prompts and re-runs only the nodes whose inputs changed, so a
    later prompt gets the earlier prompt's model (and segmentation) objects back; the test passes them on the same way.
    """

    def __init__(self):
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt_worker")

    def run(self, prompt):
        def execute():
            with torch.inference_mode():
                return prompt()

        return self._thread.submit(execute).result()

    def close(self) -> None:
        self._thread.shutdown()


ADAPTER_CONFIG = dict(rank=4, alpha=16, levels=(2,), base_model="tiny/sd2")


@pytest.fixture
def comfy_host(comfy):
    """The fake ComfyUI with a saved tiny model in models/digseg (plus an adapter next to it), and a prompt worker."""
    from digseg_diffusers import DiGSegAdapterConfig
    from digseg_diffusers.adapter import apply_adapter

    fake, nodes = comfy
    folder = Path(fake.modules["folder_paths"].models_dir) / "digseg" / "tiny"
    make_tiny_pipeline(seed=0, training_vocabulary=["circle", "square", "star"]).save_pretrained(str(folder))
    adapted = make_tiny_pipeline(seed=0)
    trainable = apply_adapter(adapted.unet, adapted.text_projection, DiGSegAdapterConfig(**ADAPTER_CONFIG))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trainable:  # move the adapter away from its zero start, so that it changes the masks
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    adapted.save_digseg_adapter(folder / "adapter")
    worker = ComfyPromptWorker()
    yield fake, nodes, worker
    worker.close()


def load_node(nodes, precision="auto", adapter=""):
    return nodes.DiGSegModelLoader.execute(model="tiny", precision=precision, adapter=adapter).args[0]


def segment_node(nodes, model, images, prompts="circle, star", seed=0):
    return nodes.DiGSegSegment.execute(
        digseg_model=model, image=images, prompts=prompts, steps=1, ensemble_size=1, processing_resolution=32,
        mask_threshold=-1.0, background_threshold=-1.0, seed=seed, batch_size=4,
    ).args  # fmt: skip


def test_nodes_run_as_comfyui_runs_them_repeatedly_and_after_model_changes(comfy_host):
    """Loader -> Segment -> Pick Mask inside inference mode, prompt after prompt (the shipped workflow failed on every
    run in ComfyUI: the prompt cache read the version counter of the inference-tensor weights)."""
    _, nodes, worker = comfy_host
    images = comfy_images(batch=1, height=32, width=32)

    def first_prompt():
        model = load_node(nodes)
        masks, label_map, overlay, segmentation = segment_node(nodes, model, images)
        star = nodes.DiGSegPickMask.execute(segmentation=segmentation, select="star", kind="mask").args[0]
        return model, masks, label_map, overlay, segmentation, star

    model, masks, label_map, overlay, segmentation, star = worker.run(first_prompt)
    assert model.pipeline.unet.conv_in.weight.is_inference()  # what ComfyUI hands the pipeline
    assert masks.shape == (2, 32, 32) and label_map.shape == (1, 32, 32) and overlay.shape == (1, 32, 32, 3)
    assert torch.equal(star, masks[1:2])
    assert model.pipeline.prompt_cache_info()["misses"] == 2

    # Next prompt, only Pick Mask's widget changed: ComfyUI re-runs it on the cached segmentation.
    circle = worker.run(lambda: nodes.DiGSegPickMask.execute(segmentation=segmentation, select="circle", kind="region"))
    assert torch.equal(circle.args[0], (label_map == 1).float())

    # Next prompts, Segment's seed changed and back: the cached model, and the prompts from the prompt cache.
    worker.run(lambda: segment_node(nodes, model, images, seed=1))
    again = worker.run(lambda: segment_node(nodes, model, images, seed=0))[3]
    assert model.pipeline.prompt_cache_info()["hits"] == 4  # two prompts, two runs served from the cache
    assert_close_across_paths(again.probabilities, segmentation.probabilities, what="probabilities after cache hits")
    assert worker.run(lambda: load_node(nodes)) is model  # the loader re-run (e.g. after a model switch back) reuses it

    # Another model in the loader: half precision, an adapter; each one runs, and the adapter changes the masks.
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = worker.run(partial(load_node, nodes, precision=precision))
        assert half is not model and half.dtype == dtype and half.pipeline.unet.dtype == dtype
        half_result = worker.run(partial(segment_node, nodes, half, images))
        assert half_result[0].dtype == torch.float32 and half_result[0].shape == (2, 32, 32)
        assert torch.isfinite(half_result[3].probabilities).all()
    adapted = worker.run(lambda: load_node(nodes, adapter="adapter"))
    assert adapted is not model and adapted.pipeline.get_active_adapters() == ["digseg"]
    adapted_result = worker.run(lambda: segment_node(nodes, adapted, images))[3]
    assert float((adapted_result.probabilities - segmentation.probabilities).abs().max()) > 1e-4

    # And back to the first settings: evicted from the loader's two-model cache meanwhile, so loaded again.
    reloaded = worker.run(lambda: load_node(nodes))
    assert reloaded is not model and model.patcher.detached
    result = worker.run(lambda: segment_node(nodes, reloaded, images))[3]
    assert_close_across_paths(result.probabilities, segmentation.probabilities, what="probabilities after a reload")


def test_prompts_outside_the_training_vocabulary_are_named_in_the_log(comfy_host, caplog):
    """ComfyUI's log is the root logger: the warning names the unknown prompts and what the model knows."""
    _, nodes, worker = comfy_host
    images = comfy_images(batch=1, height=32, width=32)
    model = worker.run(lambda: load_node(nodes))
    with caplog.at_level(logging.WARNING):
        worker.run(lambda: segment_node(nodes, model, images, prompts="circle, star"))
    assert not [r for r in caplog.records if "vocabulary" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        worker.run(lambda: segment_node(nodes, model, images, prompts="person, star, sky"))
    warnings = [r.getMessage() for r in caplog.records if "vocabulary" in r.getMessage()]
    assert len(warnings) == 1
    assert "'person'" in warnings[0] and "'sky'" in warnings[0] and "'star'" not in warnings[0]
    assert "circle, square, star" in warnings[0]  # what the model was trained on


def test_proposal_node_runs_as_comfyui_runs_it(comfy_host):
    fake, nodes, worker = comfy_host
    folder = Path(fake.modules["folder_paths"].models_dir) / "digseg" / "tiny-proposer"
    make_tiny_proposer().save_pretrained(str(folder))

    def propose():
        return nodes.DiGSegClassProposal.execute(
            image=comfy_images(batch=1), proposer="tiny-proposer", vocabulary="custom", global_threshold=-1.0,
            patch_threshold=-1.0, top_k=2, custom_classes="cat, dog, bird",
        ).args[0]  # fmt: skip

    first = worker.run(propose)
    assert len(first.split("\n")) == 2
    assert worker.run(propose) == first  # the cached proposer and its cached vocabulary embeddings


# ------------------------------------------------------------------------------------------------ defaults, messages


def test_segment_defaults_to_prompts_the_demo_model_knows(comfy):
    _, nodes = comfy
    vocabulary = logic.demo_model_vocabulary()
    assert vocabulary == ["circle", "square", "triangle", "star", "ring", "cross"]
    prompts_input = next(i for i in nodes.DiGSegSegment.define_schema().inputs if i.id == "prompts")
    defaults = logic.parse_prompts(prompts_input.kwargs["default"])
    assert len(defaults) >= 2 and set(defaults) <= set(vocabulary)
    assert ", ".join(vocabulary) in prompts_input.kwargs["tooltip"]
    model_input = nodes.DiGSegModelLoader.define_schema().inputs[0]
    assert ", ".join(vocabulary) in model_input.kwargs["tooltip"]


def test_a_missing_library_is_one_line_with_the_install_from_a_clone(comfy, monkeypatch):
    """ComfyUI logs what `comfy_entrypoint` raises: the missing module and the install that works today."""
    import comfy_nodes

    for name in ("comfy_nodes.nodes", "comfy_nodes.logic"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(comfy_nodes, "logic")  # else `from . import logic` takes the attribute
    monkeypatch.setitem(sys.modules, "digseg_diffusers", None)  # importing it raises ModuleNotFoundError
    with pytest.raises(ImportError) as raised:
        asyncio.run(comfy_nodes.comfy_entrypoint())
    message = str(raised.value)
    assert "'digseg_diffusers' is missing" in message and "\n" not in message
    assert "pip install -r requirements.txt" in message and "pip install digseg-diffusers" not in message


def test_example_workflows_use_only_known_nodes_and_valid_links():
    folder = REPO_ROOT / "comfy_nodes" / "workflows"
    ours = {"DiGSegModelLoader", "DiGSegSegment", "DiGSegPickMask", "DiGSegClassProposal"}
    core = {"LoadImage", "PreviewImage", "SaveImage", "MaskToImage"}
    api_files = sorted(folder.glob("*_api.json"))
    assert [path.name for path in api_files] == ["digseg_propose_and_segment_api.json", "digseg_segment_api.json"]
    for path in api_files:
        api = json.loads(path.read_text())
        for node_id, node in api.items():
            assert node["class_type"] in ours | core
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in api, f"{path.name}: node {node_id} links to missing node {value[0]}"
    ui_files = sorted(folder.glob("*_ui.json"))
    assert ui_files
    for path in ui_files:
        ui = json.loads(path.read_text())
        node_ids = {node["id"] for node in ui["nodes"]}
        for link in ui["links"]:
            _, origin, _, target, _, _ = link
            assert origin in node_ids and target in node_ids
        assert {node["type"] for node in ui["nodes"]} <= ours | core
