"""Model cards and Hub uploads for DiGSeg adapters and pipelines.

The card's YAML front matter follows the Hub's model-card metadata: `library_name`, `pipeline_tag:
image-segmentation`, `base_model` with `base_model_relation: adapter`, the license inherited from the base
model when it can be read, `datasets`, `tags` and a `model-index` holding the validation metrics.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
LIBRARY_NAME = "digseg-diffusers"
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "hub_cards" / "adapter_card_template.md"

_FALLBACK_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

DiGSeg adapter for `{{ base_model }}`. Load with `pipe.load_digseg_adapter("{{ repo_id }}")`.

{{ metrics_table }}
"""


def base_model_license(base_model: str | None) -> str | None:
    """The license in the base model's own card, when the base is a local folder with one (no network)."""
    if not base_model or not os.path.isdir(base_model):
        return None
    readme = Path(base_model) / CARD_NAME
    if not readme.is_file():
        return None
    match = re.match(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8"), flags=re.S)
    if not match:
        return None
    data = yaml.safe_load(match.group(1)) or {}
    return data.get("license")


def card_metadata(
    base_model: str | None,
    repo_id: str | None,
    dataset_name: str | None,
    metrics: dict[str, float] | None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> dict[str, Any]:
    """The YAML front matter of a DiGSeg adapter card, as a dict."""
    name = repo_id or "digseg-adapter"
    data: dict[str, Any] = {
        "library_name": LIBRARY_NAME,
        "pipeline_tag": "image-segmentation",
        "license": license or base_model_license(base_model) or "other",
        "tags": ["digseg", "diffusers", "segmentation", "open-vocabulary-segmentation", "lora"] + list(tags or []),
    }
    if base_model:
        data["base_model"] = base_model
        data["base_model_relation"] = "adapter"
    if dataset_name:
        data["datasets"] = [dataset_name]
    if metrics:
        data["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "image-segmentation", "name": "Semantic segmentation"},
                        "dataset": {"name": dataset_name or "validation", "type": dataset_name or "custom"},
                        "metrics": [
                            {"type": key, "value": round(float(value), 4), "name": key}
                            for key, value in metrics.items()
                            if key != "step" and isinstance(value, (int, float))
                        ],
                    }
                ],
            }
        ]
    return data


def _metrics_table(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "No validation was run for this adapter."
    rows = [f"| {key} | {value:.4f} |" for key, value in metrics.items() if isinstance(value, float)]
    step = f" (step {metrics['step']})" if "step" in metrics else ""
    return f"Validation{step}:\n\n| metric | value |\n| --- | --- |\n" + "\n".join(rows)


def write_adapter_card(
    folder: str | os.PathLike,
    base_model: str | None,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    class_names: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    training_args: dict[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
    license: str | None = None,
) -> str:
    """Write `README.md` (the model card) into `folder`, filled from the adapter's config and the metrics."""
    folder = Path(folder)
    adapter_config = {}
    config_file = folder / "digseg_adapter_config.json"
    if config_file.is_file():
        adapter_config = json.loads(config_file.read_text())
    template_path = Path(template_path) if template_path else DEFAULT_TEMPLATE
    template = template_path.read_text(encoding="utf-8") if template_path.is_file() else _FALLBACK_TEMPLATE
    training_args = training_args or {}
    metadata = card_metadata(base_model, repo_id, dataset_name, metrics, license=license)
    text_encoder = training_args.get("text_encoder")
    values = {
        "card_data": yaml.safe_dump(metadata, sort_keys=False).strip(),
        "model_name": (repo_id or folder.name).split("/")[-1],
        "base_model": base_model or "unknown",
        "repo_id": repo_id or str(folder),
        "text_encoder_argument": f', text_encoder="{text_encoder}"' if text_encoder else "",
        "example_prompt": (class_names or ["object"])[0],
        "mode": adapter_config.get("mode", "?"),
        "levels": adapter_config.get("levels", "?"),
        "rank": adapter_config.get("rank", "?"),
        "alpha": adapter_config.get("alpha", "?"),
        "include_mid_block": adapter_config.get("include_mid_block", "?"),
        "train_conv_in": adapter_config.get("train_conv_in", "?"),
        "dataset_name": dataset_name or "?",
        "num_classes": len(class_names) if class_names else "?",
        "max_train_steps": training_args.get("max_train_steps", "?"),
        "resolution": training_args.get("resolution", "?"),
        "learning_rate": training_args.get("learning_rate", "?"),
        "noise_variant": training_args.get("noise_variant", "?"),
        "metrics_table": _metrics_table(metrics),
    }
    card = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(values.get(m.group(1), m.group(0))), template)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_NAME
    path.write_text(card, encoding="utf-8")
    return str(path)


def read_card_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a card's YAML front matter (used by tests and to check cards before upload)."""
    text = Path(path).read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---", text, flags=re.S)
    if not match:
        raise ValueError(f"{path} has no YAML front matter.")
    return yaml.safe_load(match.group(1))


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the repo if needed and upload `folder`; a clear error when the Hub cannot be reached."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload DiGSeg adapter")
    except Exception as error:  # network, auth, offline mode: keep the local folder, say why the upload failed
        raise RuntimeError(
            f"Could not upload {folder} to the Hub as {repo_id!r} ({type(error).__name__}: {error}). The adapter "
            f"and its card are saved locally in {folder}; upload them later with `huggingface-cli upload {repo_id} {folder}`."
        ) from error
    return str(getattr(commit, "commit_url", commit))
