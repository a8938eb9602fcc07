"""The layout of a saved DiGSeg pipeline, so that stock diffusers loads it like any Hub custom pipeline.

diffusers loads a class it does not ship from a code file in the repo: ``model_index.json`` names the pipeline
``["pipeline_digseg", "DiGSegPipeline"]`` (file ``pipeline_digseg.py`` at the root) and each custom component
``["<module>", "<Class>"]`` (file ``<component>/<module>.py``). Ours are *loader stubs* that import the class from
the installed package, so the code that runs is the user's installed version, not a copy frozen into every model;
without the package they raise an ``ImportError`` naming the install (`INSTALL_HINT`). Then
``DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)`` loads it.
``DiGSegPipeline.from_pretrained`` executes no stub (`package_model_index` maps the entries back to the package);
`write_loader_files` upgrades folders saved before this layout (``"_class_name": "DiGSegPipeline"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
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


def _class_of_component(entry: Any) -> str | None:
    """The class name of a ``[module, class]`` component entry of ``model_index.json``; None for anything else."""
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def _stub_files(model_index: dict[str, Any]) -> dict[str, str]:
    """Relative path -> text of every loader stub a folder with this ``model_index.json`` needs."""
    files = {f"{PIPELINE_MODULE}.py": loader_stub(f"{PACKAGE}.{PIPELINE_MODULE}", PIPELINE_CLASS_NAME)}
    for component, (stub_module, package_module) in CUSTOM_COMPONENT_MODULES.items():
        class_name = _class_of_component(model_index.get(component))
        if class_name is not None:
            files[f"{component}/{stub_module}.py"] = loader_stub(package_module, class_name)
    return files


def hub_model_index(model_index: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json`` as stock diffusers needs it: the pipeline and custom components point at the stubs."""
    converted = dict(model_index)
    converted["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS_NAME]
    for component, (stub_module, _) in CUSTOM_COMPONENT_MODULES.items():
        class_name = _class_of_component(converted.get(component))
        if class_name is not None:
            converted[component] = [stub_module, class_name]
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
    index_path = Path(save_directory) / MODEL_INDEX_NAME
    model_index = json.loads(index_path.read_text(encoding="utf-8"))
    if package_model_index(model_index).get("_class_name") != PIPELINE_CLASS_NAME:
        raise ValueError(f"{index_path} is not a DiGSeg pipeline (`_class_name` is {model_index.get('_class_name')!r}).")
    model_index = hub_model_index(model_index)
    stubs = _stub_files(model_index)
    for relative_path, text in stubs.items():
        path = Path(save_directory) / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    index_path.write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [MODEL_INDEX_NAME, *stubs]


def main(argv: list[str] | None = None) -> None:
    """``python -m digseg_diffusers.hub.layout FOLDER...``: upgrade saved pipeline folders in place."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folders", nargs="+", help="saved DiGSeg pipeline folders")
    for folder in parser.parse_args(argv).folders:
        print(f"{folder}: wrote {', '.join(write_loader_files(folder))}")


if __name__ == "__main__":
    main()
