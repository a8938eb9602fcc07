"""ComfyUI custom nodes for DiGSeg: text-prompted segmentation masks inside ComfyUI graphs (install: README.md).

V3 schema (`comfy_entrypoint`), pinned to ``comfy_api.v0_0_2`` (ComfyUI 0.3.64 and later). Importing this package
outside ComfyUI works and registers nothing: ComfyUI is imported only when it calls `comfy_entrypoint`.
"""

from __future__ import annotations

__all__ = ["comfy_entrypoint"]

INSTALL_ADVICE = (
    "clone the digseg-diffusers repository into ComfyUI/custom_nodes/ and run `pip install -r requirements.txt` "
    "in the clone with ComfyUI's Python (ComfyUI-Manager's 'Install via Git URL' does both), or `pip install "
    "/path/to/digseg-diffusers` (a clone) into ComfyUI's Python when linking comfy_nodes/ on its own"
)


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension that lists the DiGSeg nodes."""
    try:
        from .nodes import DiGSegExtension
    except ModuleNotFoundError as error:  # ComfyUI logs this one line instead of a traceback from deep inside
        raise ImportError(f"DiGSeg nodes: the Python module {error.name!r} is missing; {INSTALL_ADVICE}.") from error

    return DiGSegExtension()
