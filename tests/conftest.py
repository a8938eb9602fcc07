import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hub_constants

from digseg_diffusers.testing_utils import make_tiny_pipeline

torch.set_num_threads(min(2, torch.get_num_threads()))


def _is_hub_variable(name: str) -> bool:
    """Environment variables that change where or whether huggingface_hub looks (offline mode, endpoint, cache,
    token, timeouts): ``HF_*``, ``HUGGINGFACE_*`` and ``TRANSFORMERS_OFFLINE`` (read into ``HF_HUB_OFFLINE``)."""
    return name.startswith(("HF_", "HUGGINGFACE_")) or name == "TRANSFORMERS_OFFLINE"


def _clean_hub_constants() -> dict:
    """huggingface_hub's constants as a shell without Hub variables gives them (a second copy of the module,
    evaluated with those variables removed; the imported module is left alone)."""
    spec = importlib.util.spec_from_file_location("_hub_constants_without_environment", hub_constants.__file__)
    module = importlib.util.module_from_spec(spec)
    saved = {name: value for name, value in os.environ.items() if _is_hub_variable(name)}
    try:
        for name in saved:
            del os.environ[name]
        spec.loader.exec_module(module)
    finally:
        os.environ.update(saved)
    return {name: value for name, value in vars(module).items() if name.isupper()}


CLEAN_HUB_CONSTANTS = _clean_hub_constants()
SHELL_HUB_CONSTANTS = {
    name: getattr(hub_constants, name)
    for name, value in CLEAN_HUB_CONSTANTS.items()
    if getattr(hub_constants, name, None) != value
}
"""The constants the caller's shell changed (usually none), with the shell's values."""
COPYING_PACKAGES = ("huggingface_hub.", "diffusers.", "transformers.", "peft.", "accelerate.", "digseg_diffusers.")
"""Packages whose modules copy constants at import (diffusers: ``from huggingface_hub.constants import
HF_HUB_OFFLINE`` in its LoRA loader and telemetry)."""


@pytest.fixture(autouse=True)
def no_hub_environment(monkeypatch):
    """Every test sees huggingface_hub as a shell without ``HF_*`` variables configures it (online mode, the
    default endpoint and cache), and starts subprocesses without them: the suite passes the same with and without
    ``HF_HUB_OFFLINE=1`` (or a token, or another endpoint) in the caller's shell. Tests that need offline mode or
    another endpoint set it themselves with ``monkeypatch``."""
    for name in [name for name in os.environ if _is_hub_variable(name)]:
        monkeypatch.delenv(name)
    for name, value in CLEAN_HUB_CONSTANTS.items():
        if getattr(hub_constants, name, None) != value:
            monkeypatch.setattr(hub_constants, name, value)
    if SHELL_HUB_CONSTANTS:
        for module_name, module in list(sys.modules.items()):
            if module is hub_constants or not module_name.startswith(COPYING_PACKAGES):
                continue
            for name, shell_value in SHELL_HUB_CONSTANTS.items():
                if name in vars(module) and vars(module)[name] is shell_value:
                    monkeypatch.setattr(module, name, CLEAN_HUB_CONSTANTS[name])


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny random pipeline shared by the read-only tests (never modify it in a test)."""
    return make_tiny_pipeline(seed=0)


@pytest.fixture
def rgb_image():
    return np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
