"""The package's shape, read from its source with ``ast``: no import circle
among the modules of ``triton_bloom/`` and ``kernels/`` (an import inside a
function counts: it is a dependency all the same, only a later one), and no
file over 700 lines.  A failure names the circle, each step with the file
and line of its import, or the files and their lengths."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each folder with the package name its modules install under (pyproject maps
# kernels/ to triton_bloom.kernels).
PACKAGES = {ROOT / "triton_bloom": "triton_bloom", ROOT / "kernels": "triton_bloom.kernels"}
MAX_LINES = 700


def package_files():
    """``{module name: path}`` for every ``.py`` file of the two folders."""
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def _is_package(name, files):
    return files[name].name == "__init__.py"


def _module_of(name, files):
    """The longest prefix of the dotted ``name`` that is a package module
    (``a.b.c`` names module ``a.b``'s attribute ``c`` when ``a.b.c`` is none)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in files:
        parts.pop()
    return ".".join(parts) if parts else None


def _resolve(module, node, files):
    """The package modules one ``import`` or ``from ... import`` statement
    depends on: ``from . import x`` on module ``x``, ``from .m import f`` on
    module ``m`` (the parent package itself only when a name comes from it)."""
    if isinstance(node, ast.Import):
        return {m for alias in node.names if (m := _module_of(alias.name, files))}
    if node.level:
        base = module.split(".")
        # A package's own relative imports start at the package itself.
        drop = node.level - 1 if _is_package(module, files) else node.level
        stem = ".".join(base[: len(base) - drop] + ([node.module] if node.module else []))
    else:
        stem = node.module
    found = set()
    for alias in node.names:
        full = f"{stem}.{alias.name}"
        target = full if full in files else _module_of(stem, files)
        if target:
            found.add(target)
    return found


def import_graph():
    """``{module: {module it imports: first line of that import}}``, imports at
    any depth (in functions, methods, ``if`` blocks) included."""
    files = package_files()
    graph = {}
    for module, path in files.items():
        edges = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, node, files):
                    if target != module:
                        edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def describe(cycle, graph, files):
    return (
        " -> ".join(f"{a} ({files[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:]))
        + f" -> {cycle[-1]}"
    )


def test_no_import_circle():
    graph, files = import_graph(), package_files()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + describe(cycle, graph, files)


def test_cycle_finder_names_a_circle():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {}}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_graph_sees_imports_inside_functions():
    # An edge made by function-level imports only (modules -> output).
    graph = import_graph()
    assert "triton_bloom.output" in graph["triton_bloom.modules"]


def line_counts():
    return {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in package_files().values()}


def test_no_file_over_max_lines():
    too_long = {name: n for name, n in line_counts().items() if n > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"
