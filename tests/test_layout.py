"""The architecture stays readable: the rules CONTRIBUTING.md gives for the
product's code, checked on the source itself.

- no import cycle among the project's modules, imports inside functions
  included (commands -> engine -> builders, never back);
- no product file over 500 lines, no function over 80;
- nothing outside tests/ imports test code.
"""

from __future__ import annotations

import ast
from pathlib import Path

from support import REPO

PRODUCT = ["deploy", "metaflow_services", "metaflow_extensions"]
OUTSIDE_TESTS = PRODUCT + ["examples", "benchmarks", "scripts", "fabfile.py"]
TEST_MODULES = {"harness", "support", "deploylab", "conftest", "vm", "browser"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def python_files(roots):
    for root in roots:
        path = REPO / root
        yield from [path] if path.is_file() else sorted(path.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set:
    """Every module *path* imports, at any depth of its code, resolved to
    absolute names (``from . import x`` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update("%s.%s" % (base, a.name) for a in node.names)
    return found


def project_graph():
    files = {module_name(p): p for p in python_files(PRODUCT + ["fabfile.py"])}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imports_of(path, name):
            # The longest project module the import names (a name imported
            # from a module is that module).
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ re-exporting its own modules is not a cycle
            # through them.
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
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


def test_no_import_cycle_among_the_projects_modules():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_product_file_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in python_files(PRODUCT)
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, "split these files (lines): %s" % long


def test_no_function_over_80_lines():
    long = {}
    for p in python_files(PRODUCT):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long["%s:%s" % (p.relative_to(REPO), node.name)] = n
    assert not long, "split these functions (lines): %s" % long


def test_nothing_outside_tests_imports_test_code():
    offenders = {}
    for p in python_files(OUTSIDE_TESTS):
        if p.suffix != ".py":
            continue
        names = imports_of(p, module_name(p))
        bad = sorted(n for n in names if n.split(".")[0] in TEST_MODULES | {"tests"})
        if bad:
            offenders[str(p.relative_to(REPO))] = bad
    assert not offenders, offenders


def test_every_deploy_test_module_has_its_place_in_the_order():
    """An unlisted module runs after the lean variant and the VM's
    replacement, on a stack it was not written for."""
    from support import DEPLOY_ORDER

    modules = {p.stem for p in (REPO / "tests" / "deploy").glob("test_deploy_*.py")}
    assert modules == set(DEPLOY_ORDER), modules ^ set(DEPLOY_ORDER)
