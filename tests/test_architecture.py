"""The package's layout stays what docs/architecture.md draws: no module-level import cycles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "digseg_diffusers"


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at module level (imports inside functions and TYPE_CHECKING blocks
    are not run at import time, so they cannot make a cycle)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        if "models" in path.relative_to(PACKAGE).parts:  # saved model folders' loader stubs
            continue
        parts = ("digseg_diffusers", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module or "") if p)
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in modules and c != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_package_has_no_module_level_import_cycles():
    graph = _module_graph()
    assert len(graph) > 30 and "digseg_diffusers.lora_loader" in graph["digseg_diffusers.pipeline_digseg"]
    assert "digseg_diffusers.image_processing" in graph["digseg_diffusers.data.readers"]  # `from ..x` resolved
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
