"""ComfyUI's entry point when this repository is cloned into ``ComfyUI/custom_nodes/`` (the nodes: ``comfy_nodes/``).

ComfyUI-Manager clones and runs ``pip install -r requirements.txt``, nothing else, and ``digseg-diffusers`` is on no
package index yet: the nodes use the clone's own ``digseg_diffusers/``, imported here under its usual name, without
putting the repository root (with ``tests/``, ``training/``, ``benchmarks/``) on ``sys.path``.
"""

import importlib.util
import os
import sys

LIBRARY = "digseg_diffusers"


def import_bundled_library() -> None:
    """Import the clone's ``digseg_diffusers`` under that name, unless one is imported already.

    It wins over an installed ``digseg-diffusers``: the nodes of this commit were tested against its library.
    """
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY)
    init = os.path.join(folder, "__init__.py")
    if LIBRARY in sys.modules or not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(LIBRARY, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[LIBRARY] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(LIBRARY, None)
        raise


# ComfyUI imports this folder as a package. Tools that import the file on its own (pytest, when the clone's folder
# name is not an identifier, e.g. "digseg-diffusers") must not fail on the relative import.
if __package__:
    import_bundled_library()
    from .comfy_nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
