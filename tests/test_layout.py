"""The architecture of launcher/ as an enforced rule: rooms in layers, imports only go down, no cycles.

README.md's "Architecture" section says the same in prose; change the two together. The checks read the
source with `ast` (nothing is imported), take a package root, and return one message per broken rule, so
they also run on the tiny synthetic packages below, which prove that each rule can fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parent.parent / "launcher"

# Lowest first; a module may import its own layer or a lower one. "x.*" is the package x and all below it;
# the most specific pattern wins (launcher.rank.model.fill is rank.model, launcher.rank.loop is rank).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "launcher",
            "launcher.atomic",
            "launcher.errors",
            "launcher.procs",
            "launcher.progress",
            "launcher.safe_files",
        ),
    ),
    ("plan", ("launcher.plan.*",)),
    ("rundir", ("launcher.rundir",)),
    ("data", ("launcher.data.*",)),
    ("rank.model", ("launcher.rank.model.*",)),
    ("rank", ("launcher.rank.*",)),
    ("ui", ("launcher.ui.*",)),
    ("launch", ("launcher.launch.*",)),
    ("cli", ("launcher.cli",)),
)
LAYER_NAMES = tuple(name for name, _ in LAYERS)

# Narrower than the layer order: the CLI parses flags and hands over to launch/; the rank side, the data
# cache and the run directory are launch/'s business, so the CLI reaches them only through it.
ONLY_FROM: dict[str, tuple[str, ...]] = {"launcher.cli": ("base", "plan", "ui", "launch")}

# plan/ is pure and cheap to import (the CLI's `plan`, `explain`, `config` run without a GPU stack); these
# may not be imported when a plan module is, directly or through the modules it imports.
PURE_LAYERS = ("plan",)
HEAVY = ("torch", "bitsandbytes", "peft", "deepspeed", "accelerate")

MAX_LINES = 600  # hard limit; the issue aims at ~500


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from the module that holds it."""

    importer: str
    target: str  # dotted name; the submodule where `from pkg import name` names one
    where: str  # "launcher/x/y.py:LINE"
    at_import_time: bool  # False inside a function body: runs only when the function is called
    type_only: bool  # under `if TYPE_CHECKING:`: never runs, but still a dependency of the design


def module_files(root: Path) -> dict[str, Path]:
    """Every module under the package root by dotted name (a package's __init__.py is the package)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer whose most specific pattern matches the module; None when no pattern does."""
    best: tuple[int, str] | None = None
    for name, patterns in LAYERS:
        for pattern in patterns:
            base = pattern.removesuffix(".*")
            exact = pattern == base
            if module == base or (not exact and module.startswith(base + ".")):
                if best is None or len(base) > best[0]:
                    best = (len(base), name)
    return best[1] if best else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Collects every import of one module: module level, in functions, under TYPE_CHECKING, import_module("x")."""

    def __init__(self, module: str, package: str, where: str, known: set[str]) -> None:
        self.module, self.package, self.where, self.known = module, package, where, known
        self.function_depth = 0
        self.type_only_depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, line: int) -> None:
        self.found.append(
            Import(
                self.module,
                target,
                f"{self.where}:{line}",
                at_import_time=self.function_depth == 0,
                type_only=self.type_only_depth > 0,
            )
        )

    def _in_function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_only_depth += 1
        for child in node.body:
            self.visit(child)
        self.type_only_depth -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: `from . import x` in launcher/rank/loop.py is launcher.rank.x
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                self._add(node.args[0].value, node.lineno)
        self.generic_visit(node)


def imports_of(root: Path) -> list[Import]:
    """Every import in every module under the root, in file and line order."""
    files = module_files(root)
    known = set(files)
    found: list[Import] = []
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        collector = _ImportCollector(module, package, str(path.relative_to(root.parent)), known)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += dict.fromkeys(collector.found)  # `from x import a, b` is one import of x, said once
    return found


def _internal(imports: list[Import], root: Path) -> list[Import]:
    """The imports of the package's own modules (self-imports dropped: they are no dependency)."""
    known = set(module_files(root))
    return [i for i in imports if i.target in known and i.target != i.importer]


def _rank(layer: str) -> int:
    return LAYER_NAMES.index(layer)


def unplaced_modules(root: Path) -> list[str]:
    """Modules that no layer claims: a new module or room has to be placed before it may exist."""
    return [
        f"{path.relative_to(root.parent)}: module {module} belongs to no layer. Fix: place it in LAYERS in "
        f"tests/test_layout.py (and README.md's Architecture map), or move it into a room that has a layer"
        for module, path in module_files(root).items()
        if layer_of(module) is None
    ]


def upward_imports(root: Path) -> list[str]:
    """Imports of a higher layer, in functions and under TYPE_CHECKING too (a late import is still a dependency)."""
    found = []
    for imp in _internal(imports_of(root), root):
        low, high = layer_of(imp.importer), layer_of(imp.target)
        if low is None or high is None or _rank(high) <= _rank(low):
            continue
        how = "" if imp.at_import_time else " (inside a function: it still counts)"
        found.append(
            f"{imp.where}: {imp.importer} (layer {low}) imports {imp.target} (layer {high}){how}; imports only "
            f"go down ({' < '.join(LAYER_NAMES)}). Fix: move what {imp.importer} needs into layer {low} or "
            f"below, or let the {high} side pass it in"
        )
    return found


def narrow_imports(root: Path) -> list[str]:
    """Imports by a module of ONLY_FROM outside the layers it may use."""
    found = []
    for imp in _internal(imports_of(root), root):
        allowed = ONLY_FROM.get(imp.importer)
        layer = layer_of(imp.target)
        if allowed is None or layer is None or layer in allowed:
            continue
        found.append(
            f"{imp.where}: {imp.importer} imports {imp.target} (layer {layer}); {imp.importer} may import only "
            f"{', '.join(allowed)}. Fix: reach it through launcher.launch (a function there that does this step)"
        )
    return found


def heavy_imports(root: Path) -> list[str]:
    """Heavy libraries that importing a pure-layer module loads, directly or through the modules it imports."""
    imports = [i for i in imports_of(root) if i.at_import_time and not i.type_only]
    known = set(module_files(root))
    by_importer: dict[str, list[Import]] = {}
    for imp in imports:
        by_importer.setdefault(imp.importer, []).append(imp)
    found = []
    for start in sorted(m for m in known if layer_of(m) in PURE_LAYERS):
        # Breadth first through the launcher modules it loads; chain = the imports that led to each one.
        chains: dict[str, list[Import]] = {start: []}
        queue = [start]
        while queue:
            module = queue.pop(0)
            for imp in by_importer.get(module, []):
                if imp.target.split(".")[0] in HEAVY:
                    steps = [*chains[module], imp]
                    path = ", then ".join(f"{s.where} imports {s.target}" for s in steps)
                    found.append(
                        f"{path}: importing {start} loads {imp.target} ({'/'.join(PURE_LAYERS)} must stay pure "
                        f"and cheap to import). Fix: import {imp.target.split('.')[0]} inside the function "
                        f"that needs it, or move that code out of {'/'.join(PURE_LAYERS)}"
                    )
                elif imp.target in known and imp.target not in chains and layer_of(imp.target) not in PURE_LAYERS:
                    chains[imp.target] = [*chains[module], imp]  # other pure modules are checked on their own
                    queue.append(imp.target)
    return found


def _components(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """Strongly connected components (Tarjan), iteratively so a deep graph cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                yield sorted(component)


def _one_cycle(start: str, members: set[str], edges: dict[tuple[str, str], Import]) -> list[Import]:
    """A shortest import path from start back to start inside one component."""
    came_by: dict[str, Import] = {}
    queue = [start]
    while queue:
        module = queue.pop(0)
        for (a, b), imp in sorted(edges.items()):
            if a != module or b not in members or b in came_by:
                continue
            came_by[b] = imp
            if b == start:
                steps = [imp]
                while steps[0].importer != start:
                    steps.insert(0, came_by[steps[0].importer])
                return steps
            queue.append(b)
    raise AssertionError(f"{start} is on no cycle of {sorted(members)}")


def import_cycles(root: Path) -> list[str]:
    """Import cycles between modules (any component of more than one module, within a layer too)."""
    edges: dict[tuple[str, str], Import] = {}
    for imp in _internal(imports_of(root), root):
        edges.setdefault((imp.importer, imp.target), imp)  # the first line that makes the edge
    graph: dict[str, set[str]] = {m: set() for m in module_files(root)}
    for a, b in edges:
        graph[a].add(b)
    found = []
    for component in _components(graph):
        if len(component) < 2:
            continue
        steps = _one_cycle(component[0], set(component), edges)
        path = ", ".join(f"{s.importer} -> {s.target} ({s.where})" for s in steps)
        found.append(
            f"import cycle among {', '.join(component)}: {path}. Fix: move what they share into a module "
            f"that both import (in the lower layer), so the imports run one way"
        )
    return found


def oversized_modules(root: Path) -> list[str]:
    """Modules over MAX_LINES lines."""
    found = []
    for path in module_files(root).values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            found.append(
                f"{path.relative_to(root.parent)}: {lines} lines, over the {MAX_LINES}-line limit. Fix: split it "
                f"into modules named for what each part does (aim for ~500 lines)"
            )
    return found


CHECKS = (unplaced_modules, upward_imports, narrow_imports, heavy_imports, import_cycles, oversized_modules)


# --- the real package --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check",
    CHECKS,
    ids=lambda c: c.__name__,
)
def test_launcher_keeps_its_layout(check):
    broken = check(LAUNCHER)
    assert not broken, "\n".join(broken)


def test_every_layer_holds_a_module():
    # A layer that matches nothing is a stale table (a renamed room): the rules would then guard nothing.
    layers = {layer_of(m) for m in module_files(LAUNCHER)}
    assert layers == set(LAYER_NAMES), f"layers with no module: {sorted(set(LAYER_NAMES) - layers)}"


# --- synthetic packages: each rule provably fails ------------------------------------------------------------


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package named launcher under tmp_path from {relative path: source}; packages get an __init__.py."""
    root = tmp_path / "launcher"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            (root / parent / "__init__.py").touch()
        path.write_text(text, encoding="utf-8")
    return root


def test_a_tidy_package_passes(tmp_path):
    root = write_package(
        tmp_path,
        {
            "errors.py": "",
            "plan/recipe.py": "from launcher.errors import *\n",
            "rank/loop.py": "from launcher.plan import recipe\nfrom . import model\n",
            "rank/model/fill.py": "import torch\nfrom launcher.plan.recipe import x\n",
            "launch/run.py": "import launcher.rank.loop as loop\n",
            "cli.py": "def main():\n    from launcher.launch import run\n",
        },
    )
    assert [m for check in CHECKS for m in check(root)] == []


def test_an_upward_import_is_reported(tmp_path):
    root = write_package(tmp_path, {"plan/recipe.py": "\n\nfrom launcher.rank.loop import step\n", "rank/loop.py": ""})
    (msg,) = upward_imports(root)
    assert msg.startswith("launcher/plan/recipe.py:3: launcher.plan.recipe (layer plan) imports launcher.rank.loop")
    assert "(layer rank)" in msg and "imports only go down" in msg and "Fix:" in msg


@pytest.mark.parametrize(
    "source",
    [
        "def f():\n    import launcher.ui.live as live\n",
        "def f():\n    from launcher.ui import live\n",
        "def f():\n    from ...ui import live\n",
        "import importlib\ndef f():\n    return importlib.import_module('launcher.ui.live')\n",
    ],
    ids=["import-as", "from-package", "relative", "import_module"],
)
def test_a_function_level_upward_import_is_reported(tmp_path, source):
    root = write_package(tmp_path, {"rank/model/quant.py": source, "ui/live.py": ""})
    line = source.count("\n", 0, source.index("live")) + 1
    (msg,) = upward_imports(root)
    assert msg.startswith(f"launcher/rank/model/quant.py:{line}: launcher.rank.model.quant (layer rank.model) imports")
    assert "launcher.ui.live (layer ui) (inside a function: it still counts)" in msg


def test_a_type_checking_upward_import_is_reported(tmp_path):
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from launcher.launch.run import Thing\n"
    root = write_package(tmp_path, {"data/pack.py": source, "launch/run.py": ""})
    (msg,) = upward_imports(root)
    assert msg.startswith("launcher/data/pack.py:3: launcher.data.pack (layer data) imports launcher.launch.run")


def test_a_cycle_is_reported(tmp_path):
    root = write_package(
        tmp_path,
        {
            "data/a.py": "from launcher.data import b\n",
            "data/b.py": "import os\n\ndef f():\n    from launcher.data.a import g\n",
        },
    )
    (msg,) = import_cycles(root)
    assert msg.startswith("import cycle among launcher.data.a, launcher.data.b:")
    assert "launcher.data.a -> launcher.data.b (launcher/data/a.py:1)" in msg
    assert "launcher.data.b -> launcher.data.a (launcher/data/b.py:4)" in msg


def test_a_longer_cycle_across_layers_is_reported(tmp_path):
    # base -> plan is also an upward import; the cycle check reports it on its own as well.
    root = write_package(
        tmp_path,
        {
            "errors.py": "from launcher.plan.recipe import x\n",
            "plan/recipe.py": "from launcher.plan.limits import y\n",
            "plan/limits.py": "import launcher.errors\n",
        },
    )
    (msg,) = import_cycles(root)
    assert "launcher.errors, launcher.plan.limits, launcher.plan.recipe" in msg
    for step in (
        "launcher.errors -> launcher.plan.recipe (launcher/errors.py:1)",
        "launcher.plan.recipe -> launcher.plan.limits (launcher/plan/recipe.py:1)",
        "launcher.plan.limits -> launcher.errors (launcher/plan/limits.py:1)",
    ):
        assert step in msg


def test_a_601_line_module_is_reported(tmp_path):
    root = write_package(tmp_path, {"ui/live.py": "x = 1\n" * 601, "ui/report.py": "x = 1\n" * 600})
    (msg,) = oversized_modules(root)
    assert msg.startswith("launcher/ui/live.py: 601 lines, over the 600-line limit")


def test_an_unplaced_module_is_reported(tmp_path):
    root = write_package(tmp_path, {"helpers.py": "", "tools/thing.py": "", "plan/new.py": ""})
    msgs = unplaced_modules(root)
    assert [m.split(":")[0] for m in msgs] == [
        "launcher/helpers.py",
        "launcher/tools/__init__.py",
        "launcher/tools/thing.py",
    ]
    assert "module launcher.helpers belongs to no layer" in msgs[0] and "LAYERS" in msgs[0]


@pytest.mark.parametrize("target", ["launcher.rank.checkpoint_dir", "launcher.data.cache", "launcher.rundir"])
def test_cli_importing_below_launch_is_reported(tmp_path, target):
    rel = target.removeprefix("launcher.").replace(".", "/") + ".py"
    name = target.rpartition(".")[2]
    root = write_package(
        tmp_path, {rel: "", "cli.py": f"def main():\n    from {target.rpartition('.')[0]} import {name}\n"}
    )
    (msg,) = narrow_imports(root)
    assert msg.startswith(f"launcher/cli.py:2: launcher.cli imports {target}")
    assert "may import only base, plan, ui, launch" in msg
    assert upward_imports(root) == []  # it is a downward import; only the narrower rule catches it


def test_plan_loading_a_heavy_library_is_reported(tmp_path):
    root = write_package(
        tmp_path,
        {
            "plan/memory.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n",
            "plan/model_info.py": "def f():\n    import transformers, torch\n",
            "plan/recipe.py": "try:\n    import peft.tuners\nexcept ImportError:\n    pass\n",
            "plan/limits.py": "from launcher import procs\n",
            "procs.py": "\nfrom torch import distributed\n",
        },
    )
    msgs = heavy_imports(root)
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith(
        "launcher/plan/limits.py:1 imports launcher.procs, then launcher/procs.py:2 imports torch: "
        "importing launcher.plan.limits loads torch"
    )
    assert msgs[1].startswith("launcher/plan/recipe.py:2 imports peft.tuners: importing launcher.plan.recipe loads")
