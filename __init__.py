"""ComfyUI entry point when this whole repository is cloned into ``ComfyUI/custom_nodes/`` (ComfyUI-Manager style).

The nodes themselves live in ``comfy_nodes/``; ``pip install`` the repository into ComfyUI's Python as well.
"""

from .comfy_nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
