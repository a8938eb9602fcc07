"""The embedded demo model: a small DiGSeg pipeline trained by this project on the synthetic shape world.

So that a new user sees the method segment something in the first minute without downloading SD or CLIP, the
package ships a few-MB DiGSeg model (small VAE, frozen character-level CLIP text encoder, SD2-layout U-Net trained
from scratch) for the classes of `digseg_diffusers.data.synthetic.SHAPE_CLASSES` in 64 px scenes.
`training/train_demo_model.py` reproduces it; `hub_cards/demo_model_card.md` documents it. Load it by path
(`default_model_path()`) or by its short name::

    from digseg_diffusers import DiGSegPipeline
    pipe = DiGSegPipeline.from_pretrained("digseg-demo")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .hub.layout import MODEL_INDEX_NAME

DEMO_MODEL_NAME = "digseg-demo"
"""Short name that `DiGSegPipeline.from_pretrained` (and the CLI's `--model`) resolve to the packaged folder."""


def default_model_path() -> str:
    """Folder of the embedded demo model inside the installed package.

    Raises:
        FileNotFoundError: when this installation carries no demo model (e.g. a source checkout without it).
    """
    path = Path(__file__).resolve().parent / "models" / "demo"
    if not (path / MODEL_INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"The embedded demo model is missing: {path} has no {MODEL_INDEX_NAME}. Reinstall from a clone of "
            "the repository (`pip install -e .`), or rebuild it with `python training/train_demo_model.py`."
        )
    return str(path)


def demo_model_vocabulary() -> list[str] | None:
    """The classes the embedded demo model was trained on, read from its model_index.json without loading the model
    or importing torch (the CLI's `--help` and ComfyUI's node schemas say them); None when none is installed."""
    try:
        index = json.loads((Path(default_model_path()) / MODEL_INDEX_NAME).read_text(encoding="utf-8"))
        return list(index["training_vocabulary"])
    except (OSError, ValueError, KeyError, TypeError):  # FileNotFoundError: no demo model in this installation
        return None


def demo_model_summary() -> str:
    """One sentence on what the embedded demo model can segment (for `--help` and `digseg demo`)."""
    classes = demo_model_vocabulary()
    if classes is None:
        return f"The embedded demo model ({DEMO_MODEL_NAME}) segments only the shapes of its synthetic training world."
    return (
        f"The embedded demo model (--model {DEMO_MODEL_NAME}, the default) segments only {len(classes)} synthetic "
        f"shapes ({', '.join(classes)}) in small drawn scenes; for photos and other classes give --model a trained "
        "DiGSeg pipeline."
    )


def resolve_model_name(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """`DEMO_MODEL_NAME` -> the packaged folder; anything else (a folder, a Hub id) is returned unchanged.

    A local folder that happens to be called "digseg-demo" wins over the packaged model.
    """
    if isinstance(name_or_path, str) and name_or_path == DEMO_MODEL_NAME and not os.path.isdir(name_or_path):
        return default_model_path()
    return name_or_path
