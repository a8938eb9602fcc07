"""The layout of a saved DiGSeg pipeline, so that stock diffusers loads it like any Hub custom pipeline.

diffusers resolves a pipeline whose class is not part of diffusers through code files in the repo (see diffusers'
``custom_pipeline_overview.md`` and ``pipeline_loading_utils.py``):

- ``model_index.json`` names the pipeline as ``"_class_name": ["pipeline_digseg", "DiGSegPipeline"]`` and the root of
  the folder holds ``pipeline_digseg.py``;
- each custom component is named ``["<module>", "<Class>"]`` and its folder holds ``<module>.py``
  (``text_projection/digseg_text_projection.py``, ``mask_decoder/digseg_mask_decoder.py``).

Those files are loaded as standalone modules (no package around them, so no relative imports). Ours are short
*loader stubs* that import the classes from the installed ``digseg_diffusers`` package: the code that runs is the
package's, versioned and installed by the user, not a copy frozen into every saved model. Without the package, the
stub raises an ``ImportError`` that says how to install the package (`INSTALL_HINT`).

So a saved folder or Hub repo loads with::

    DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)
    DiffusionPipeline.from_pretrained(path_or_repo_id, custom_pipeline="pipeline_digseg", trust_remote_code=True)

``DiGSegPipeline.from_pretrained`` executes none of these files: `package_model_index` maps the stub entries back
to the package's own classes before diffusers sees them. Folders saved before this layout (``"_class_name":
"DiGSegPipeline"``) still load with ``DiGSegPipeline.from_pretrained``; `write_loader_files` upgrades them.
"""

from __future__ import annotations

import json
import os
from typing import Any

MODEL_INDEX_NAME = "model_index.json"
PIPELINE_CLASS_NAME = "DiGSegPipeline"
PIPELINE_MODULE = "pipeline_digseg"
"""Stem of the loader stub at the root of a saved pipeline (``pipeline_digseg.py``)."""

PACKAGE = "digseg_diffusers"
REPOSITORY_URL = "https://github.com/digseg-diffusers/digseg-diffusers"
INSTALL_HINT = f"pip install git+{REPOSITORY_URL}"
"""How to install the package: it is on no package index yet, so from its repository (or `pip install -e .` in a
clone)."""

# component name -> (stub module in the component's folder, the package module that defines the class)
CUSTOM_COMPONENT_MODULES: dict[str, tuple[str, str]] = {
    "text_projection": ("digseg_text_projection", f"{PACKAGE}.text_projection"),
    "mask_decoder": ("digseg_mask_decoder", f"{PACKAGE}.mask_decoder"),
}

_STUB_TEMPLATE = '''"""Loader stub of a DiGSeg model (written by digseg-diffusers; do not edit).

diffusers loads this file when the model is opened with
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`. It only imports `{class_name}` from the installed
`digseg_diffusers` package, which holds the code.
"""

try:
    from {package_module} import {class_name}
except ImportError as error:
    raise ImportError(
        "This model is a DiGSeg pipeline: loading it needs the `digseg-diffusers` package "
        "(`{install_hint}`), which provides `{class_name}`. Import error: " + str(error)
    ) from error

__all__ = ["{class_name}"]
'''


def loader_stub(package_module: str, class_name: str) -> str:
    """The text of the stub that re-exports ``class_name`` from ``package_module``."""
    return _STUB_TEMPLATE.format(package_module=package_module, class_name=class_name, install_hint=INSTALL_HINT)


def _stub_files(model_index: dict[str, Any]) -> dict[str, str]:
    """Relative path -> text of every loader stub a folder with this ``model_index.json`` needs."""
    files = {f"{PIPELINE_MODULE}.py": loader_stub(f"{PACKAGE}.{PIPELINE_MODULE}", PIPELINE_CLASS_NAME)}
    for component, (stub_module, package_module) in CUSTOM_COMPONENT_MODULES.items():
        entry = model_index.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
            files[f"{component}/{stub_module}.py"] = loader_stub(package_module, entry[1])
    return files


def hub_model_index(model_index: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json`` as stock diffusers needs it: the pipeline and custom components point at the stubs."""
    converted = dict(model_index)
    converted["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS_NAME]
    for component, (stub_module, _) in CUSTOM_COMPONENT_MODULES.items():
        entry = converted.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
            converted[component] = [stub_module, entry[1]]
    return converted


def package_model_index(model_index: dict[str, Any], components: bool = True) -> dict[str, Any]:
    """The inverse of `hub_model_index`: entries that name the package's classes, so that no stub is executed.

    With ``components=False`` only ``_class_name`` is mapped: diffusers' Hub download checks that each component
    entry names a file in the repo (the stubs) before it loads anything, so the download step must see them.
    """
    converted = dict(model_index)
    class_name = converted.get("_class_name")
    if isinstance(class_name, (list, tuple)) and list(class_name) == [PIPELINE_MODULE, PIPELINE_CLASS_NAME]:
        converted["_class_name"] = PIPELINE_CLASS_NAME
    if components:
        for component, (stub_module, package_module) in CUSTOM_COMPONENT_MODULES.items():
            entry = converted.get(component)
            if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == stub_module:
                converted[component] = [package_module, entry[1]]
    return converted


def write_loader_files(save_directory: str | os.PathLike) -> list[str]:
    """Give a saved DiGSeg pipeline folder the Hub custom-pipeline layout; returns the files written.

    Rewrites ``model_index.json`` (`hub_model_index`) and writes the loader stubs. Idempotent; also upgrades a
    folder saved by an older digseg-diffusers.
    """
    save_directory = str(save_directory)
    index_path = os.path.join(save_directory, MODEL_INDEX_NAME)
    with open(index_path, encoding="utf-8") as handle:
        model_index = json.load(handle)
    if package_model_index(model_index).get("_class_name") != PIPELINE_CLASS_NAME:
        raise ValueError(f"{index_path} is not a DiGSeg pipeline (`_class_name` is {model_index.get('_class_name')!r}).")
    model_index = hub_model_index(model_index)
    written = []
    for relative_path, text in _stub_files(model_index).items():
        path = os.path.join(save_directory, *relative_path.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        written.append(relative_path)
    with open(index_path, "w", encoding="utf-8") as handle:
        json.dump(model_index, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return [MODEL_INDEX_NAME] + written


def main(argv: list[str] | None = None) -> None:
    """``python -m digseg_diffusers.hub.layout FOLDER...``: upgrade saved pipeline folders in place."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folders", nargs="+", help="saved DiGSeg pipeline folders")
    for folder in parser.parse_args(argv).folders:
        print(f"{folder}: wrote {', '.join(write_loader_files(folder))}")


if __name__ == "__main__":
    main()
