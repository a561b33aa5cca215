"""The code's shape (docs/layout.md), over jaxcifar/ (with its subpackages) and scripts/: no import circle, no name
private to one module used from another (tests included) nor patched by string, no function over 60 lines, no module
over 400, and torch imported only by the fidelity port, so that the base install never needs it."""

import ast
from pathlib import Path

from conftest import REPO

LONGEST_FUNCTION = 60
LONGEST_MODULE = 400  # lines: past it, a module has held several concerns every time so far
SOURCES = sorted(REPO.glob("jaxcifar/**/*.py")) + sorted(REPO.glob("scripts/*.py"))
TORCH_MODULE = "jaxcifar.fidelity.torch_port"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCES}


def imported_modules(tree: ast.AST) -> dict[str, str]:
    """{name bound in the file: the jaxcifar module it names} for every import of one, at the top or in functions."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxcifar"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                bound[alias.asname or alias.name] = full if full in MODULES else node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxcifar"):
                    bound[alias.asname or alias.name] = alias.name
    return bound


def test_no_import_circle():
    graph = {name: set(imported_modules(ast.parse(path.read_text())).values()) - {name}
             for name, path in MODULES.items()}
    assert all(m in graph for deps in graph.values() for m in deps), graph
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in SOURCES + sorted((REPO / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = imported_modules(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxcifar"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names if private(a.name)]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                  and private(node.attr)):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == [], found


def test_no_test_patches_a_private_name_by_string():
    # monkeypatch.setattr(obj, "_name", ...) or setattr(obj, "_name", ...), and "module._name" targets: a test that
    # reaches a private name this way is bound to code that may change without notice; patch a public seam.
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
                    and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("setattr", "delattr")):
                continue
            strings = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            found += [f"{path.name}:{node.lineno}: {s}" for s in strings if any(private(part) for part in s.split("."))]
    assert found == [], found


def test_no_function_is_longer_than_a_screen():
    long = [f"{p.relative_to(REPO)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p in SOURCES
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > LONGEST_FUNCTION]
    assert long == [], long


def test_no_module_is_longer_than_its_concern():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in SOURCES if (n := len(p.read_text().splitlines())) > LONGEST_MODULE]
    assert long == [], long


def test_only_the_fidelity_port_imports_torch_at_its_top():
    def top_level_imports(tree):
        for node in tree.body:
            if isinstance(node, ast.Import):
                yield from (a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield node.module.split(".")[0]

    importers = [name for name, path in MODULES.items() if "torch" in top_level_imports(ast.parse(path.read_text()))]
    assert importers == [TORCH_MODULE]
    # and nothing imports the port at its top: it loads only when a PyTorch run is asked for
    port_importers = [name for name, path in MODULES.items()
                      if any(isinstance(n, ast.ImportFrom) and n.module == "jaxcifar.fidelity"
                             and any(a.name == "torch_port" for a in n.names) for n in ast.parse(path.read_text()).body)]
    assert port_importers == []
