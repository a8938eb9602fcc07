"""Model cards built with huggingface_hub: metadata the Hub understands, shipped templates, the demo card, uploads."""

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import digseg_diffusers
from digseg_diffusers.hub import cards as hub
from digseg_diffusers.testing_utils import make_tiny_pipeline, write_hub_cache

ROOT = Path(__file__).resolve().parent.parent


def test_adapter_metadata_is_hub_metadata():
    data = hub.card_data("stabilityai/stable-diffusion-2-base", "me/digseg-ade", "scene_parse_150",
                         {"mIoU": 0.41, "pixel_accuracy": 0.8, "step": 100}, adapter=True)  # fmt: skip
    meta = data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["license"] == "openrail++" and "license_name" not in meta
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-base" and meta["base_model_relation"] == "adapter"
    assert meta["datasets"] == ["scene_parse_150"] and "lora" in meta["tags"]
    result = data.eval_results[0]
    assert (result.task_type, result.dataset_type, result.dataset_split) == ("image-segmentation", "scene_parse_150", "validation")
    assert {r.metric_type: r.metric_value for r in data.eval_results} == {"mean_iou": 0.41, "overall_accuracy": 0.8}
    # The front matter round-trips through huggingface_hub's parser (what the Hub does with it).
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n# x\n")
    assert card.data.eval_results[0].metric_type == "mean_iou"


def test_local_base_paths_are_dropped_and_licenses_are_real(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "sd2"
    folder.mkdir()
    with caplog.at_level("WARNING"):
        meta = hub.card_data(str(folder), None, adapter=True).to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta and "not a Hugging Face Hub repo id" in caplog.text
    assert hub.hub_base_model("/abs/path/model") is None and hub.hub_base_model("./rel") is None
    assert hub.base_model_license("stable-diffusion-v1-5/stable-diffusion-v1-5") == {"license": "creativeml-openrail-m"}
    # Another base: its license comes from its card in the Hub cache (no network), else "other" with a link.
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    write_hub_cache(tmp_path / "cache", "someone/base", tmp_path / "base", with_tree=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.base_model_license("someone/base") == {"license": "mit"}
    unknown = hub.base_model_license("someone/uncached")
    assert unknown["license"] == "other" and unknown["license_link"] == "https://huggingface.co/someone/uncached"
    assert unknown["license_name"]
    assert hub.base_model_license(None) == {"license": "apache-2.0"}  # trained from scratch: the project's own


def test_templates_are_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "hub/card_templates/*" in package_data["digseg_diffusers"]
    package = Path(digseg_diffusers.__file__).parent
    for template in (hub.ADAPTER_TEMPLATE, hub.PIPELINE_TEMPLATE):
        assert template.parent == package / "hub" / "card_templates" and template.is_file()


def test_adapter_card_from_a_saved_adapter(tmp_path):
    from digseg_diffusers.adapter import DiGSegAdapterConfig, apply_adapter

    pipe = make_tiny_pipeline()
    apply_adapter(pipe.unet, pipe.text_projection, DiGSegAdapterConfig(rank=4, alpha=16))
    pipe.save_digseg_adapter(tmp_path)
    path = hub.write_adapter_card(tmp_path, "stabilityai/stable-diffusion-2", repo_id="me/ad", dataset_name="ds",
                                  metrics={"mIoU": 0.5}, training_args={"hub_token": "hf_secret", "max_train_steps": 7})  # fmt: skip
    text = Path(path).read_text()
    assert "hf_secret" not in text and "steps: 7" in text and "| LoRA rank / alpha | 4 / 16 |" in text
    assert 'pipe.load_lora_weights("me/ad"' in text and "https://github.com/)" not in text
    assert hub.read_card_metadata(path)["base_model_relation"] == "adapter"


@pytest.mark.parametrize("name", ["out/adapter", "adapter", "missing/deeper/folder"])
def test_adapter_card_into_a_missing_folder_fails_at_once_naming_it(tmp_path, monkeypatch, name):
    """A missing folder whose name reads as a Hub id ("out/adapter") was looked up on the Hub (~30 s of retries),
    then a card for no adapter was written, creating the folder."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_digseg_adapter") as error:
        hub.write_adapter_card(name, "stabilityai/stable-diffusion-2")
    assert repr(name) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / name).exists()


def test_pipeline_push_uploads_the_digseg_card_and_layout(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploads = []

    def upload_folder(self, folder_path, repo_id, commit_message=None, create_pr=False, **kwargs):
        uploads.append((repo_id, sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()),
                        (Path(folder_path) / "README.md").read_text()))  # fmt: skip
        return "https://huggingface.co/me/digseg-tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: repo_id)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    pipe = make_tiny_pipeline(base_model="stabilityai/stable-diffusion-2-base")
    pipe.push_to_hub("me/digseg-tiny")
    pipe.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/digseg-tiny")
    for repo_id, files, card in uploads:
        assert repo_id == "me/digseg-tiny" and "pipeline_digseg.py" in files and "model_index.json" in files
        assert "DiffusionPipeline.from_pretrained(\"me/digseg-tiny\", trust_remote_code=True)" in card
        assert "More Information Needed" not in card
        meta = ModelCard(card).data.to_dict()
        assert meta["library_name"] == "diffusers" and meta["license"] == "openrail++"
        assert meta["base_model"] == "stabilityai/stable-diffusion-2-base" and "base_model_relation" not in meta
    assert len(uploads) == 2


def test_failed_upload_names_the_current_cli(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    def refuse(self, *args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(RuntimeError) as error:
        hub.push_folder_to_hub(tmp_path, "me/x")
    assert "hf auth login" in str(error.value) and "hf upload me/x" in str(error.value)
    assert "huggingface-cli" not in str(error.value)


def test_demo_card_model_index_is_the_measured_benchmark(tmp_path):
    """The committed card matches benchmarks/quality/demo_fidelity.json; after a new benchmark run, regenerate it with
    `python -m digseg_diffusers.hub.cards update-demo-card`."""
    card = tmp_path / "card.md"
    shutil.copy(ROOT / "hub_cards" / "demo_model_card.md", card)
    assert not hub.update_demo_card(card, ROOT / "benchmarks" / "quality" / "demo_fidelity.json"), "run update-demo-card"
    fidelity = json.loads((ROOT / "benchmarks" / "quality" / "demo_fidelity.json").read_text())
    default = next(r for r in fidelity["rows"] if r["ensemble"] == 1 and r["steps"] == 1)
    data = ModelCard.load(card).data
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {"mean_iou": round(default["mIoU"], 4), "overall_accuracy": round(default["pixel_accuracy"], 4)}
    assert data.eval_results[0].dataset_split == "test" and data.library_name == "diffusers"
    # A changed benchmark changes the card.
    fidelity["rows"][0]["mIoU"] = 0.9
    (tmp_path / "fidelity.json").write_text(json.dumps(fidelity))
    assert hub.update_demo_card(card, tmp_path / "fidelity.json")
    assert {r.metric_type: r.metric_value for r in ModelCard.load(card).data.eval_results}["mean_iou"] == 0.9


def test_pipeline_card_says_what_the_model_can_segment():
    from digseg_diffusers.hub.cards import pipeline_card

    closed = str(pipeline_card(make_tiny_pipeline(training_vocabulary=["cat", "traffic light"]), repo_id="me/x"))
    assert "trained on 2 classes only" in closed and "`cat`, `traffic light`" in closed
    opened = str(pipeline_card(make_tiny_pipeline(), repo_id="me/x"))
    assert "An open vocabulary" in opened and "classes only" not in opened
