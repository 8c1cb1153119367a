"""The package's shape, read statically from its source: no import cycles, no private names crossing modules, and
the shipped `models/` folder standing alone (the files `save_pretrained` copies to every Hub repo); and the fresh
process that the remote-code tests load saved folders in really has no hf_tinysaver."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import fresh_process_environment

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "hf_tinysaver"
SHIPPED_PACKAGE = f"{PACKAGE}.models"
# What a machine that loads a saved cascade with transformers alone has: the torch, transformers, timm and
# numpy, plus what timm itself installs and the processor needs (torchvision, and pillow through it).
SHIPPED_THIRD_PARTY = {"torch", "transformers", "timm", "numpy", "torchvision", "PIL"}


@dataclass(frozen=True)
class Import:
    """One import statement of a package module, resolved to the package module it loads."""

    importer: str
    target: str
    line: int
    function: str | None  # the enclosing function of an import run on call, None at module level

    def describe(self) -> str:
        where = f"in {self.function}()" if self.function else "at module level"
        return f"{self.importer} -> {self.target} (line {self.line}, {where})"


@dataclass(frozen=True)
class ImportedName:
    """A name taken from another package module, by `from x import name` or as the attribute `module.name`."""

    importer: str
    source: str
    name: str
    line: int


@dataclass
class ModuleImports:
    """What one module imports: package modules, names taken from them, and every import statement as written."""

    package_imports: list[Import]
    imported_names: list[ImportedName]
    absolute_imports: list[tuple[str, int, str | None]]  # (module as written, line, function) of `import x`/`from x`
    relative_imports: list[tuple[str, int, str | None]]  # the same for `from .x import`, with its dots


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` under `root`."""
    modules = {}
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


class _ImportCollector(ast.NodeVisitor):
    """Walks one module, remembering the enclosing function of each import; skips `if TYPE_CHECKING:` blocks, which
    never run."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]):
        self.module, self.modules = module, modules
        self.current_package = module if is_package else module.rpartition(".")[0]
        self.functions: list[str] = []
        self.module_aliases: dict[str, str] = {}  # local name -> package module, for `alias._private` accesses
        self.found = ModuleImports([], [], [], [])

    @property
    def function(self) -> str | None:
        return ".".join(self.functions) or None

    def _add(self, target: str, line: int) -> None:
        if target != self.module:
            self.found.package_imports.append(Import(self.module, target, line, self.function))

    def _known_module(self, dotted: str) -> str | None:
        """The longest prefix of `dotted` that is a package module (`import a.b.c` loads `a.b.c`, or `a.b` for a
        name defined there)."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.modules:
                return candidate
        return None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking_block(node):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.absolute_imports.append((alias.name, node.lineno, self.function))
            target = self._known_module(alias.name)
            if target is not None:
                self._add(target, node.lineno)
                if alias.asname:
                    self.module_aliases[alias.asname] = target

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self.found.relative_imports.append(("." * node.level + (node.module or ""), node.lineno, self.function))
            base = self.current_package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.current_package
            source = f"{base}.{node.module}" if node.module else base
        else:
            self.found.absolute_imports.append((node.module, node.lineno, self.function))
            source = node.module
        if self._known_module(source) is None:
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:  # `from package import module`
                self._add(submodule, node.lineno)
                self.module_aliases[alias.asname or alias.name] = submodule
            else:
                self._add(self._known_module(source), node.lineno)
                self.found.imported_names.append(ImportedName(self.module, source, alias.name, node.lineno))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases:
            source = self.module_aliases[node.value.id]
            self.found.imported_names.append(ImportedName(self.module, source, node.attr, node.lineno))
        self.generic_visit(node)


def collect_imports(root: Path = SOURCE_ROOT, package: str = PACKAGE) -> dict[str, ModuleImports]:
    """Every module of `package` under `root` -> its imports, read with `ast` (nothing is imported)."""
    modules = package_modules(root, package)
    found = {}
    for module, path in modules.items():
        collector = _ImportCollector(module, path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found[module] = collector.found
    return found


def import_cycles(imports: dict[str, ModuleImports]) -> list[list[Import]]:
    """One cycle (as its chain of imports) per group of modules that import each other, directly or not.

    The groups are the strongly connected components of the import graph (Tarjan); each is reported by one shortest
    cycle through its first module, which is enough to see what to cut."""
    graph: dict[str, dict[str, Import]] = {module: {} for module in imports}
    for module, found in imports.items():
        for edge in found.package_imports:
            graph[module].setdefault(edge.target, edge)  # the first import of a module names the edge
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                connect(successor)
                lowlink[node] = min(lowlink[node], lowlink[successor])
            elif successor in on_stack:
                lowlink[node] = min(lowlink[node], index[successor])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    recursion_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(recursion_limit, 10 * len(graph)))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(recursion_limit)

    cycles = []
    for component in sorted(components):
        members, start = set(component), component[0]
        paths: dict[str, list[Import]] = {start: []}
        frontier = [start]
        while frontier and "cycle" not in paths:
            next_frontier = []
            for node in frontier:
                for successor, edge in sorted(graph[node].items()):
                    if successor == start:
                        paths.setdefault("cycle", paths[node] + [edge])
                    elif successor in members and successor not in paths:
                        paths[successor] = paths[node] + [edge]
                        next_frontier.append(successor)
            frontier = next_frontier
        cycles.append(paths["cycle"])
    return cycles


def private_names_crossing_modules(imports: dict[str, ModuleImports]) -> list[ImportedName]:
    """Names starting with one underscore that a module takes from another package module."""
    return [
        name
        for found in imports.values()
        for name in found.imported_names
        if name.name.startswith("_") and not name.name.startswith("__") and name.source != name.importer
    ]


def shipped_folder_violations(imports: dict[str, ModuleImports], shipped_package: str = SHIPPED_PACKAGE) -> list[str]:
    """What the shipped folder's modules import beyond the standard library, `SHIPPED_THIRD_PARTY` and flat
    `from .sibling import ...` imports of each other (anywhere in the file: inside functions and `try` too, since a
    saved model must not behave differently where hf_tinysaver happens to be installed).

    The package's own `__init__.py` is not shipped (`save_pretrained` copies a class's module file and the files it
    imports relatively, never the package file), so it may connect the shipped classes to the rest of the library;
    `test_shipped_files.py` checks the files of real saved folders."""
    violations = []
    for module, found in sorted(imports.items()):
        if not module.startswith(f"{shipped_package}."):
            continue
        for written, line, function in found.absolute_imports:
            top_level = written.split(".")[0]
            if top_level not in sys.stdlib_module_names and top_level not in SHIPPED_THIRD_PARTY:
                violations.append(f"{module} line {line} ({function or 'module level'}): imports {written!r}")
        for written, line, function in found.relative_imports:
            if written.count(".") != 1 or written == ".":  # `from .. import`, `from .a.b import`, `from . import x`
                violations.append(
                    f"{module} line {line} ({function or 'module level'}): `from {written} import` is not a flat "
                    "import of a sibling shipped file"
                )
    return violations


@pytest.fixture(scope="module")
def package_imports() -> dict[str, ModuleImports]:
    return collect_imports()


def test_the_package_has_no_import_cycles(package_imports):
    assert len(package_imports) > 20, "the scan should see every module of the package"
    cycles = import_cycles(package_imports)
    report = "\n".join("cycle:\n  " + "\n  ".join(edge.describe() for edge in cycle) for cycle in cycles)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) in src/{PACKAGE}:\n{report}", pytrace=False)


def test_no_private_name_is_imported_from_another_module(package_imports):
    crossings = private_names_crossing_modules(package_imports)
    report = "\n".join(f"{name.importer} line {name.line}: {name.source}.{name.name}" for name in crossings)
    if crossings:
        pytest.fail(
            f"private names used outside their module (make them public or move the logic):\n{report}", pytrace=False
        )


def test_the_shipped_models_folder_imports_only_torch_transformers_timm_numpy_stdlib_and_itself(package_imports):
    assert any(module.startswith(f"{SHIPPED_PACKAGE}.modeling_") for module in package_imports)
    violations = shipped_folder_violations(package_imports)
    if violations:
        pytest.fail("the shipped models/ files must stand alone:\n" + "\n".join(violations), pytrace=False)


def test_the_readme_tree_is_the_package_as_it_is():
    readme = (SOURCE_ROOT.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## How it is built\n", 1)[1]
    tree = section.split("```text\n", 1)[1].split("```", 1)[0]
    # Entries are the names (ending in .py or /) in the first column, before the descriptions.
    listed = {name.rstrip("/") for line in tree.splitlines()[1:] for name in re.findall(r"[\w]+(?:\.py|/)", line[:19])}
    package = SOURCE_ROOT / PACKAGE
    present = {path.name for path in package.iterdir() if path.name != "__pycache__"}
    present = {
        name.removesuffix(".py") if name.endswith(".py") and name != "__init__.py" else name for name in present
    }
    listed = {name.removesuffix(".py") if name != "__init__.py" else name for name in listed}
    assert listed == present, (
        f"README lists {sorted(listed - present)} that do not exist, misses {sorted(present - listed)}"
    )
    # Every shipped module is named (the configuration_/modeling_/image_processing_ families by their prefix).
    families = ("configuration_", "modeling_", "image_processing_")
    for module in sorted((package / "models").glob("*.py")):
        if module.name != "__init__.py" and not module.stem.startswith(families):
            assert module.stem in tree, f"the README's tree does not name the shipped models/{module.name}"


def test_the_checks_find_what_they_look_for(tmp_path):
    """The scan above only means something if it sees cycles through function-level imports, private names taken
    by `from` and by attribute, and shipped files reaching back; shown on a small package written here."""
    files = {
        "pkg/__init__.py": "from .a import run\n",
        "pkg/a.py": "from . import b\n\ndef run():\n    return b._helper()\n",
        "pkg/b.py": "import json\n\ndef _helper():\n    from pkg.c import _secret\n    return _secret\n",
        "pkg/c.py": "_secret = 1\n\ndef later():\n    from .a import run\n    return run\n",
        "pkg/models/__init__.py": "def hook():\n    from ..a import run\n",  # not shipped: may reach the library
        "pkg/models/modeling_x.py": textwrap.dedent(
            """
            import torch
            from .configuration_x import XConfig

            def push():
                try:
                    from pkg.a import run
                except ImportError:
                    import requests
            """
        ),
        "pkg/models/configuration_x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    imports = collect_imports(tmp_path, "pkg")

    [cycle] = import_cycles(imports)
    assert [(edge.importer, edge.target, edge.function) for edge in cycle] == [
        ("pkg.a", "pkg.b", None),
        ("pkg.b", "pkg.c", "_helper"),
        ("pkg.c", "pkg.a", "later"),
    ]
    assert {(name.importer, name.source, name.name) for name in private_names_crossing_modules(imports)} == {
        ("pkg.a", "pkg.b", "_helper"),
        ("pkg.b", "pkg.c", "_secret"),
    }
    assert shipped_folder_violations(imports, "pkg.models") == [
        "pkg.models.modeling_x line 7 (push): imports 'pkg.a'",
        "pkg.models.modeling_x line 9 (push): imports 'requests'",
    ]


HIDDEN_LIBRARY_SCRIPT = """
import importlib
from transformers import AutoConfig

hidden = []
for name in ("hf_tinysaver", "hf_tinysaver.models.confidence"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        hidden.append(name)
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
result = {"hidden": hidden, "module": type(config).__module__}
"""


def test_the_fresh_process_check_hides_the_library_even_on_pythonpath(
    tiny_cascade_dir, tmp_path, run_without_hf_tinysaver
):
    # With the source tree on PYTHONPATH the library imports in a plain process; the fixture's process must not see it.
    on_path = fresh_process_environment(tmp_path / "hf_home", PYTHONPATH=str(SOURCE_ROOT))
    plain = subprocess.run([sys.executable, "-c", "import hf_tinysaver.models.confidence"], env=on_path, cwd=tmp_path)
    assert plain.returncode == 0
    result = run_without_hf_tinysaver(
        HIDDEN_LIBRARY_SCRIPT, tiny_cascade_dir, cwd=tmp_path, env={"PYTHONPATH": str(SOURCE_ROOT)}
    )
    assert result["hidden"] == ["hf_tinysaver", "hf_tinysaver.models.confidence"]
