"""Model cards and Hub uploads for DiGSeg adapters and pipelines, built with huggingface_hub's card classes.

Cards are `ModelCard`s rendered from the packaged ``card_templates/``, with metadata the Hub understands: library
and task; ``base_model`` only as a Hub repo id (a local path would leak a machine path and the Hub rejects it); the
base model's license (``other`` with a link when it cannot be known); a ``model-index`` with the Hub's metric ids.
Nothing in a card comes from a secret: `public_training_config` drops token-like arguments first.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
LIBRARY_NAME = "diffusers"
PIPELINE_TAG = "image-segmentation"
TEMPLATES = Path(__file__).resolve().parent / "card_templates"
ADAPTER_TEMPLATE = TEMPLATES / "adapter_card.md"
PIPELINE_TEMPLATE = TEMPLATES / "pipeline_card.md"
PROJECT_LICENSE = "apache-2.0"
"""License of models this project trains from scratch (the demo model): the package's own."""

TAGS = ["digseg", "image-segmentation", "open-vocabulary-segmentation", "diffusers"]

# Licenses of the Stable Diffusion families DiGSeg is built on, by Hub id prefix (first match wins).
KNOWN_BASE_LICENSES = (
    ("stabilityai/stable-diffusion-2", "openrail++"),
    ("stabilityai/stable-diffusion-xl", "openrail++"),
    ("sd2-community/", "openrail++"),
    ("stable-diffusion-v1-5/", "creativeml-openrail-m"),
    ("runwayml/stable-diffusion", "creativeml-openrail-m"),
    ("CompVis/stable-diffusion", "creativeml-openrail-m"),
)

# Our metric names -> (Hub metric id, display name). Others pass through unchanged.
HUB_METRICS = {
    "mIoU": ("mean_iou", "mIoU"),
    "pixel_accuracy": ("overall_accuracy", "pixel accuracy"),
    "mean_accuracy": ("mean_accuracy", "mean accuracy"),
    "mean_dice": ("mean_dice", "mean Dice"),
    "fwIoU": ("frequency_weighted_iou", "frequency-weighted IoU"),
}

_SECRET_ARGUMENT = re.compile(r"token|secret|password|passwd|api_?key|credential|auth", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------- secrets


def public_training_config(arguments: Mapping[str, Any], scalars_only: bool = False) -> dict[str, Any]:
    """Training arguments that are safe to log to a tracker, write into a card or a saved config.

    Drops every argument whose name looks like a secret (``hub_token``, ``*_api_key``, ``password``...).
    ``scalars_only`` keeps only int/float/str/bool values (what trackers' hyperparameter tables accept).
    """
    public = {key: value for key, value in arguments.items() if not _SECRET_ARGUMENT.search(key)}
    if scalars_only:
        public = {key: value for key, value in public.items() if isinstance(value, (int, float, str, bool))}
    return public


# -------------------------------------------------------------------------------------------- base models


def hub_base_model(base_model: str | os.PathLike | None) -> str | None:
    """``base_model`` if it is a Hub repo id; None (with a warning) for a local path or anything else."""
    if base_model is None:
        return None
    from digseg_diffusers.hub.files import looks_like_hub_id

    name = str(base_model)
    if not os.path.exists(name) and looks_like_hub_id(name):
        return name
    logger.warning(
        "base_model %r is not a Hugging Face Hub repo id; the card leaves `base_model` out (a local path "
        "means nothing on the Hub). Pass the base model's Hub id to record it.",
        name,
    )
    return None


def base_model_license(base_model: str | None) -> dict[str, str]:
    """``{"license": ...}`` (plus ``license_name`` / ``license_link`` for "other") inherited from the base model.

    Known Stable Diffusion families by id; otherwise the license in the base's card when the Hub cache has it
    (no network); otherwise "other", pointing at the base model's page.
    """
    if not base_model:
        return {"license": PROJECT_LICENSE}
    for prefix, license in KNOWN_BASE_LICENSES:
        if base_model.startswith(prefix):
            return {"license": license}
    cached = _cached_card_data(base_model)
    if cached.get("license") and cached["license"] != "other":
        return {"license": cached["license"]}
    if cached.get("license") == "other" and cached.get("license_name"):
        return {key: cached[key] for key in ("license", "license_name", "license_link") if cached.get(key)}
    return {
        "license": "other",
        "license_name": "same-as-base-model",
        "license_link": f"https://huggingface.co/{base_model}",
    }


def _cached_card_data(repo_id: str) -> dict[str, Any]:
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        path = hf_hub_download(repo_id, CARD_NAME, local_files_only=True)
        return ModelCard.load(path).data.to_dict()
    except Exception:  # not cached, not a model repo, unreadable card: no license to inherit
        return {}


# ---------------------------------------------------------------------------------------------- metadata


def _numeric_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The metrics a card shows: numbers (not booleans), without the ``step`` they were measured at."""
    return {
        key: float(value)
        for key, value in (metrics or {}).items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def eval_results(
    metrics: Mapping[str, Any] | None,
    dataset_id: str | None,
    dataset_name: str | None = None,
    dataset_split: str | None = "validation",
    task_name: str = "Semantic segmentation",
) -> list:
    """`EvalResult`s (the card's ``model-index``), one per numeric metric, with the Hub's metric ids."""
    from huggingface_hub import EvalResult

    if not dataset_id:
        return []
    return [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name=task_name,
            dataset_type=dataset_id,
            dataset_name=dataset_name or dataset_id,
            dataset_split=dataset_split,
            metric_type=HUB_METRICS.get(key, (key, key))[0],
            metric_name=HUB_METRICS.get(key, (key, key))[1],
            metric_value=round(value, 4),
        )
        for key, value in _numeric_metrics(metrics).items()
    ]


def card_data(
    base_model: str | None,
    repo_id: str | None,
    dataset_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    *,
    adapter: bool = False,
    license: str | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = "validation",
    tags: list[str] | None = None,
):
    """The card's `ModelCardData`: library, task, license, base model (a Hub id), datasets, tags, model-index."""
    from huggingface_hub import ModelCardData

    base = hub_base_model(base_model)
    licensing = {"license": license} if license else base_model_license(base)
    extra = {"base_model_relation": "adapter"} if base and adapter else {}
    results = eval_results(metrics, dataset_id, dataset_name, dataset_split)
    return ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        base_model=base,
        datasets=[dataset_id] if dataset_id else None,
        tags=list(dict.fromkeys(TAGS + (["lora"] if adapter else []) + list(tags or []))),
        model_name=(repo_id or "digseg").split("/")[-1],
        eval_results=results or None,
        **licensing,
        **extra,
    )


def card_metadata(
    base_model: str | None,
    repo_id: str | None,
    dataset_name: str | None,
    metrics: dict[str, float] | None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> dict[str, Any]:
    """The YAML front matter of an adapter card, as a dict (kept for callers of the earlier API)."""
    return card_data(base_model, repo_id, dataset_name, metrics, adapter=True, license=license, tags=tags).to_dict()


# ------------------------------------------------------------------------------------------------- cards


def _metrics_table(metrics: Mapping[str, Any] | None) -> str:
    numeric = _numeric_metrics(metrics)
    rows = [f"| {HUB_METRICS.get(key, (key, key))[1]} | {value:.4f} |" for key, value in numeric.items()]
    if not rows:
        return "No evaluation was run for this model."
    step = f" (step {metrics['step']})" if "step" in metrics else ""
    return f"Validation{step}:\n\n| metric | value |\n| --- | --- |\n" + "\n".join(rows)


def _render(template: Path, data, **values):
    from huggingface_hub import ModelCard

    return ModelCard.from_template(data, template_path=str(template), **values)


def adapter_card(
    folder: str | os.PathLike,
    base_model: str | None,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    class_names: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    training_args: Mapping[str, Any] | None = None,
    license: str | None = None,
    template_path: str | os.PathLike | None = None,
):
    """The `ModelCard` of the adapter saved in ``folder`` (its config is read from there).

    ``folder`` must be a local folder: a missing one is refused at once (the adapter reader would otherwise take
    its name for a Hub id, retry the Hub for ~30 s, then write a card for an adapter that does not exist).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Cannot write the adapter card into {os.fspath(folder)!r}: no such folder. Save the adapter there first "
            "(`pipe.save_digseg_adapter(folder)`), then write its card."
        )
    from digseg_diffusers.adapter import read_adapter_config

    adapter_config = read_adapter_config(folder) or {}
    training_args = public_training_config(training_args or {})
    data = card_data(base_model, repo_id, dataset_name, metrics, adapter=True, license=license)
    text_encoder = training_args.get("text_encoder")
    return _render(
        Path(template_path) if template_path else ADAPTER_TEMPLATE,
        data,
        model_name=data.model_name,
        base_model=data.base_model or "its base Stable Diffusion model",
        base_model_id=data.base_model or "path/or/hub-id/of/the/base/model",
        repo_id=repo_id or "path/to/this/adapter",
        text_encoder_argument=f', text_encoder="{text_encoder}"' if text_encoder else "",
        example_prompt=(class_names or ["object"])[0],
        adapter=adapter_config,
        dataset_name=dataset_name or "?",
        num_classes=len(class_names) if class_names else "?",
        training=training_args,
        metrics_table=_metrics_table(metrics),
    )


def write_adapter_card(folder: str | os.PathLike, base_model: str | None, **kwargs) -> str:
    """Write the adapter's card as ``README.md`` into ``folder``; returns its path. See `adapter_card`."""
    path = os.path.join(folder, CARD_NAME)
    adapter_card(folder, base_model, **kwargs).save(path)
    return path


def pipeline_card(pipeline, repo_id: str | None = None, metrics: Mapping[str, Any] | None = None,
                  dataset_name: str | None = None, dataset_split: str | None = "validation"):  # fmt: skip
    """The DiGSeg `ModelCard` of a whole pipeline (what `DiGSegPipeline.push_to_hub` uploads)."""
    base_model = pipeline.config.get("base_model")
    data = card_data(base_model, repo_id, dataset_name, metrics, dataset_split=dataset_split)
    components = {
        name: type(component).__name__ for name, component in pipeline.components.items() if component is not None
    }
    return _render(
        PIPELINE_TEMPLATE,
        data,
        model_name=data.model_name,
        repo_id=repo_id or "path/to/this/pipeline",
        base_model=data.base_model,
        components=components,
        config={key: value for key, value in pipeline.config.items() if key.startswith("default_")},
        training_vocabulary=pipeline.config.get("training_vocabulary"),
        metrics_table=_metrics_table(metrics),
    )


def write_pipeline_card(folder: str | os.PathLike, pipeline, **kwargs) -> str:
    """Write the pipeline's card as ``README.md`` into ``folder``; returns its path. See `pipeline_card`."""
    path = os.path.join(folder, CARD_NAME)
    pipeline_card(pipeline, **kwargs).save(path)
    return path


def read_card_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A card's metadata (YAML front matter) as a dict, parsed by huggingface_hub."""
    from huggingface_hub import ModelCard

    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---"):
        raise ValueError(f"{path} has no YAML front matter.")
    return ModelCard(text).data.to_dict()


# ------------------------------------------------------------------------------------------ the demo card


def demo_card_data(fidelity: Mapping[str, Any]):
    """`ModelCardData` of the embedded demo model from its measured benchmark (``benchmarks/quality/demo_fidelity.json``).

    The model-index holds the default setting (1 ensemble member, 1 step, the calibrated threshold) on the
    synthetic test split, as `benchmarks/quality/demo_fidelity.py` measures it.
    """
    default = next(
        (row for row in fidelity["rows"] if row.get("ensemble") == 1 and row.get("steps") == 1), fidelity["rows"][0]
    )
    metrics = {"mIoU": default["mIoU"], "pixel_accuracy": default["pixel_accuracy"]}
    return card_data(
        None,
        "digseg-demo",
        "digseg-synthetic-shapes",
        metrics,
        license=PROJECT_LICENSE,
        dataset_name="DiGSeg synthetic shapes (generator v2), 100 test-split scenes",
        dataset_split="test",
        tags=["synthetic-data"],
    )


def update_demo_card(card_path: str | os.PathLike, fidelity_path: str | os.PathLike) -> bool:
    """Regenerate the demo card's metadata from the benchmark JSON, keeping its text; True if it changed."""
    from huggingface_hub import ModelCard

    card = ModelCard(Path(card_path).read_text(encoding="utf-8"))
    new = ModelCard(f"---\n{demo_card_data(json.loads(Path(fidelity_path).read_text())).to_yaml()}\n---\n{card.text}")
    if str(new) == str(card):
        return False
    Path(card_path).write_text(str(new), encoding="utf-8")
    return True


# -------------------------------------------------------------------------------------------------- upload


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    what: str = "DiGSeg adapter",
) -> str:
    """Create the repo if needed and upload ``folder``; a clear error (and the local copy kept) when it fails."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message=commit_message or f"Upload {what}", create_pr=create_pr
        )
    except Exception as error:  # network, auth, offline mode: keep the local folder, say why the upload failed
        raise RuntimeError(
            f"Could not upload {what} {folder} to the Hub as {repo_id!r} ({type(error).__name__}: {error}). The "
            f"files are saved locally in {folder}; log in with `hf auth login` (or pass a token) and upload them "
            f"later with `hf upload {repo_id} {folder}`."
        ) from error
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None) -> None:
    """``python -m digseg_diffusers.hub.cards update-demo-card``: refresh the demo card's model-index from the benchmark."""
    import argparse

    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["update-demo-card"])
    parser.add_argument("--card", default=str(root / "hub_cards" / "demo_model_card.md"))
    parser.add_argument("--fidelity", default=str(root / "benchmarks" / "quality" / "demo_fidelity.json"))
    args = parser.parse_args(argv)
    changed = update_demo_card(args.card, args.fidelity)
    print(f"{args.card}: {'updated' if changed else 'already up to date'}")


if __name__ == "__main__":
    main()
