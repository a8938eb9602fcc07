"""digseg-diffusers: DiGSeg ("Diffusion Models as a Generalist Segmentation Learner") for diffusers.

Public names are imported lazily so that `import digseg_diffusers` stays cheap for the CLI and ComfyUI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "DiGSegPipeline": "pipeline_digseg",
    "DiGSegOutput": "pipeline_digseg",
    "BACKGROUND_LABEL": "image_processing",
    "DiGSegTextProjection": "text_projection",
    "build_char_clip_tokenizer": "tokenization",
    "DiGSegAdapterConfig": "adapter",
    "DiGSegClassProposer": "proposal",
    "DiGSegMaskDecoder": "mask_decoder",
    "ConfusionMatrix": "evaluation.metrics",
    "load_vocabulary": "vocabularies",
    "list_vocabularies": "vocabularies",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import DiGSegAdapterConfig
    from .mask_decoder import DiGSegMaskDecoder
    from .evaluation.metrics import ConfusionMatrix
    from .image_processing import BACKGROUND_LABEL
    from .pipeline_digseg import DiGSegOutput, DiGSegPipeline
    from .proposal import DiGSegClassProposer
    from .vocabularies import list_vocabularies, load_vocabulary
    from .text_projection import DiGSegTextProjection
    from .tokenization import build_char_clip_tokenizer


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
