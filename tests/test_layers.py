"""The import graph of the package: data flows one way (commands -> training loop -> core -> ops), with
no cycles, counting the imports inside functions too."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fgd"

# Each module's layer: a module imports only from lower layers (or its own, without a cycle).
# Package __init__ files only re-export and are not checked.
LAYERS = [
    {"fgd.ops", "fgd.reference"},
    {"fgd.synthetic", "fgd.timing", "fgd.distill.settings", "fgd.distill.hooks", "fgd.runlog", "fgd.checkpoint", "fgd.files",
     "fgd.evaluate", "fgd.data.*"},
    {"fgd.distill.core", "fgd.models"},
    {"fgd.distill.torchvision"},
    {"fgd.config", "fgd.viz", "fgd.bench"},
    {"fgd.integrations.ultralytics"},
    {"fgd.engine"},
    {"fgd.demo"},
    {"fgd.cli"},
]


def _layer(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if mod in layer or any(p.endswith(".*") and mod.startswith(p[:-1]) for p in layer):
            return i
    raise AssertionError(f"{mod} has no layer in tests/test_layers.py: give it one")


def _modules() -> dict:
    """module -> the fgd modules it imports (anywhere in it)."""
    graph = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        mod = ".".join(parts[:-1] if is_init else parts)
        pkg = mod if is_init else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "fgd":
                    continue
                for alias in node.names:  # `from . import ops` imports a module
                    sub = f"{target}.{alias.name}"
                    is_mod = (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or \
                        (PKG.parent / sub.replace(".", "/")).is_dir()
                    deps.add(sub if is_mod else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "fgd")
        graph[mod] = {d for d in deps if d != mod and d != "fgd._C"}
    return graph


def _resolve(mod: str, graph: dict) -> set:
    """What importing ``mod`` pulls in: a package's __init__ stands for what it re-exports."""
    return {mod} if mod not in _packages(graph) else graph[mod]


def _packages(graph):
    return {m for m in graph if (PKG.parent / m.replace(".", "/") / "__init__.py").exists()}


def test_imports_go_down_the_layers():
    graph = _modules()
    packages = _packages(graph)
    wrong = []
    for mod, deps in graph.items():
        if mod in packages:
            continue
        for dep in deps:
            for target in (_resolve(dep, graph) if dep != "fgd" else {"fgd.ops"}):
                if target in packages:
                    continue
                if _layer(target) > _layer(mod):
                    wrong.append(f"{mod} (layer {_layer(mod)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _modules()
    packages = _packages(graph)
    edges = {m: {t for d in deps for t in (_resolve(d, graph) if d in graph else {d}) if t not in packages}
             for m, deps in graph.items() if m not in packages}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    assert not cycles, cycles
