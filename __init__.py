"""ComfyUI entry point when this whole repository is cloned into ``ComfyUI/custom_nodes/``.

ComfyUI-Manager (and a manual install) put the pack in place with ``git clone`` and then run
``pip install -r requirements.txt`` in the clone, nothing else. ``digseg-diffusers`` is not on a package index yet,
so ``requirements.txt`` lists only its third-party dependencies (never torch: ComfyUI brings its own), and the
library the nodes use is the clone's own ``digseg_diffusers/`` folder, imported here under its usual name. Only that
package is made importable: the repository root (with ``tests/``, ``training/``, ``benchmarks/``) is not put on
``sys.path``. The nodes themselves live in ``comfy_nodes/``.
"""

import importlib.util
import os
import sys

LIBRARY = "digseg_diffusers"


def import_bundled_library() -> None:
    """Import the clone's ``digseg_diffusers`` as the top-level package of that name, unless one is imported already.

    The clone's copy wins over an installed ``digseg-diffusers``: the nodes of this commit were written and tested
    against the library of this commit.
    """
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY)
    if LIBRARY in sys.modules or not os.path.isfile(os.path.join(folder, "__init__.py")):
        return
    spec = importlib.util.spec_from_file_location(
        LIBRARY, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[LIBRARY] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(LIBRARY, None)
        raise


# ComfyUI imports this folder as a package. Tools that import the file on its own (pytest sets up the repository
# root as a package when the clone's folder name is not an identifier, e.g. "digseg-diffusers") must not fail on
# the relative import.
if __package__:
    import_bundled_library()
    from .comfy_nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
