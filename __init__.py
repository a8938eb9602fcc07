"""ComfyUI entry point when this whole repository is cloned into ``ComfyUI/custom_nodes/`` (ComfyUI-Manager style).

The nodes themselves live in ``comfy_nodes/``; ``pip install`` the repository into ComfyUI's Python as well.
"""

# ComfyUI imports this folder as a package. Tools that import the file on its own (pytest sets up the repository
# root as a package when the clone's folder name is not an identifier, e.g. "digseg-diffusers") must not fail on
# the relative import.
if __package__:
    from .comfy_nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
