"""The repository as a ComfyUI node pack: what ComfyUI-Manager's install (a clone in custom_nodes/, then
`pip install` of each line of requirements.txt in it) gives, and what the registry's checks look for in the code."""

import ast
import asyncio
import importlib.abc
import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "digseg_diffusers"


def requirement_lines(path: Path) -> list[str]:
    """The requirements as ComfyUI-Manager reads them: one `pip install` per line, comments dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_requirements_are_the_library_dependencies_without_torch():
    """Manager installs these from the package index: nothing unpublished, and never torch (ComfyUI has its own)."""
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = requirement_lines(REPO_ROOT / "requirements.txt")
    assert sorted(requirements) == sorted(d for d in dependencies if not d.startswith("torch"))
    assert not any(line.startswith(("-", ".", "/")) or "digseg" in line for line in requirements)


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Makes `import digseg_diffusers` fail as in a ComfyUI venv where the package was never installed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == LIBRARY:
            raise ModuleNotFoundError(f"No module named {LIBRARY!r}", name=LIBRARY)


@pytest.fixture
def without_the_library(monkeypatch):
    """Hide the installed library for one test, then put every module back as it was."""
    before = dict(sys.modules)
    for name in [n for n in sys.modules if n == LIBRARY or n.startswith(f"{LIBRARY}.")]:
        del sys.modules[name]
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(), *sys.meta_path])
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [n for n in sys.modules if n not in before]:
        del sys.modules[name]
    sys.modules.update(before)


def test_a_clone_in_custom_nodes_brings_its_own_library(without_the_library):
    """ComfyUI imports a custom node folder as `nodes.load_custom_node` does; the clone's root makes the library
    importable from the clone, without putting the repository root (tests/, training/) on sys.path."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(LIBRARY)
    module_name = str(REPO_ROOT).replace(".", "_x_")  # ComfyUI's module name for a custom node folder
    spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    path_before = list(sys.path)
    spec.loader.exec_module(module)

    library = importlib.import_module(LIBRARY)
    assert Path(library.__file__) == REPO_ROOT / LIBRARY / "__init__.py"
    prompts = importlib.import_module(f"{LIBRARY}.prompts")  # submodules come from the clone too
    assert Path(prompts.__file__).parent == REPO_ROOT / LIBRARY
    assert importlib.import_module(f"{LIBRARY}.demo").default_model_path().startswith(str(REPO_ROOT / LIBRARY))
    assert sys.path == path_before
    assert asyncio.iscoroutinefunction(module.comfy_entrypoint)


# The registry's standards forbid eval/exec and installing packages at run time (docs.comfy.org/registry/standards);
# `comfy node validate` runs ruff's S102 (exec) and S307 (eval). Unpickling is the other way a model file runs code.
FORBIDDEN_CALLS = {"eval", "exec", "os.system", "os.popen", "pickle.load", "pickle.loads", "marshal.loads"}
FORBIDDEN_IMPORTS = {"pickle", "marshal", "subprocess", "dill", "cloudpickle"}


def runtime_sources() -> list[Path]:
    """The code ComfyUI runs from a clone: the root package, the nodes and the library."""
    return [REPO_ROOT / "__init__.py", *sorted((REPO_ROOT / "comfy_nodes").rglob("*.py")),
            *sorted((REPO_ROOT / LIBRARY).rglob("*.py"))]  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_code(source: str) -> list[str]:
    """What the registry's checks would flag in one file: eval/exec, shell and pickle calls, those imports, and
    `torch.load` without ``weights_only=True``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"line {node.lineno}: {name}()")
            elif name == "torch.load" and not any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            ):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return found


def test_the_unsafe_code_check_sees_what_it_looks_for():
    source = "import subprocess\nimport torch\neval('1')\ntorch.load('x')\ntorch.load('y', weights_only=True)\n"
    assert unsafe_code(source) == [
        "line 1: import subprocess",
        "line 3: eval()",
        "line 4: torch.load without weights_only=True",
    ]


def test_the_code_comfyui_runs_has_no_eval_exec_pickle_or_subprocess():
    sources = runtime_sources()
    assert len(sources) > 20
    problems = {str(path.relative_to(REPO_ROOT)): unsafe_code(path.read_text()) for path in sources}
    assert {path: found for path, found in problems.items() if found} == {}
