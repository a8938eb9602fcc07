"""ComfyUI custom nodes for DiGSeg: text-prompted segmentation masks inside ComfyUI graphs.

Install: put (or symlink) this folder into ``ComfyUI/custom_nodes/`` and ``pip install digseg-diffusers`` into
ComfyUI's Python. The nodes use ComfyUI's V3 schema (``comfy_entrypoint``), pinned to ``comfy_api.v0_0_2``
(ComfyUI 0.3.64 and later). Importing this package outside ComfyUI works and registers nothing; the ComfyUI
imports happen only when ComfyUI calls `comfy_entrypoint`.
"""

from __future__ import annotations

__all__ = ["comfy_entrypoint"]


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension that lists the DiGSeg nodes."""
    from .nodes import DiGSegExtension

    return DiGSegExtension()
