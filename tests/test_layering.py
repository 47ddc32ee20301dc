"""Layering: no module of the package imports a module that imports it back, directly or through
others. Read from the source with `ast` (every import, also those inside functions: a lazy import is
still an arrow between layers); `from a import b` is an arrow to `a.b` where that is a module, else to
`a`. Importing `a.b` also runs `a/__init__.py`, but that is not counted as an arrow to `a`: a package
face that hands on its modules' names would otherwise close a loop with each of them."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under `root` (a folder holding top-level packages)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that module `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in out if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The loops of `graph` (name -> names it imports): each strongly connected group of two or more
    modules, sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def import_graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph(SRC)
    assert len(graph) > 20 and graph["knormpress.runner"]  # a control: the package was read, arrows were found
    loops = cycles(graph)
    detail = ["; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(loop)))}" for m in loop) for loop in loops]
    assert not loops, "import loops: " + " | ".join(detail)


def test_the_check_finds_a_loop_through_three_modules_and_a_package_face(tmp_path):
    """A control: the same reading on a made-up package with a loop a -> b -> c -> a (relative and
    absolute imports, one inside a function) and a face that only hands names on."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("from . import b\nA = 1\n")
    (pkg / "b.py").write_text("def f():\n    import pkg.c\n")
    (pkg / "c.py").write_text("from pkg.a import A\n")
    (pkg / "d.py").write_text("from pkg import A\n")  # the face, not a loop
    assert cycles(import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.c"]]
