"""Layers run one way: the adapter (polar.tuner) never imports the optimiser (polar.optim).

Loading an adapter for inference must not pull in the optimiser, and an adapter config naming a mode this version
does not know must still load; make_optimizer is where a config's mode is checked.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import peft
import pytest

import polar
from polar import PolarConfig, make_optimizer
from polar.optim import modes
from polar import optimizer_defaults
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        found |= _names_imported(node, package)
    return found


def _names_imported(node: ast.AST, package: str) -> set[str]:
    """The modules an import statement names (``from m import a`` gives ``m`` and ``m.a``), relative ones resolved
    against ``package``; nothing for other nodes."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package if node.level else ""
        module = ".".join(p for p in (base, node.module or "") if p)
        return {module} | {f"{module}.{alias.name}" for alias in node.names}
    return set()


def test_no_file_in_the_tuner_imports_the_optimiser() -> None:
    files = sorted((ROOT / "polar" / "tuner").glob("*.py"))
    assert files
    back_arrows = {f.name: sorted(m for m in _imported_modules(f) if m == "polar.optim" or m.startswith("polar.optim."))
                   for f in files}
    assert {k: v for k, v in back_arrows.items() if v} == {}


def test_the_defaults_module_is_a_leaf() -> None:
    assert _imported_modules(ROOT / "polar" / "optimizer_defaults.py") == set()


def test_importing_polar_and_its_tuner_leaves_the_optimiser_unloaded() -> None:
    code = ("import sys, polar, polar.tuner; from polar import PolarConfig; PolarConfig(r=2, target_modules=['q']); "
            "print(sorted(m for m in sys.modules if m == 'polar.optim' or m.startswith('polar.optim.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_one_definition_of_the_optimiser_defaults() -> None:
    assert modes.DEFAULT_MODE is optimizer_defaults.DEFAULT_MODE
    assert modes.DEFAULT_LAMBDA is optimizer_defaults.DEFAULT_LAMBDA
    assert modes.DEFAULT_MODE in modes.MODES
    config = PolarConfig(r=2, target_modules=TARGETS)
    assert (config.optimizer_mode, config.landing_lambda) == (modes.DEFAULT_MODE, modes.DEFAULT_LAMBDA)


def _saved_config(tmp_path: Path, **fields: object) -> Path:
    PolarConfig(r=2, alpha=4, target_modules=TARGETS).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("mode", ["riemannian", "landing", "retraction", "penalty", "euclidean"])
def test_saved_configs_with_every_mode_load_and_train_with_it(tmp_path: Path, mode: str) -> None:
    config = PolarConfig.from_pretrained(str(_saved_config(tmp_path, optimizer_mode=mode, landing_lambda=0.25)))
    assert (config.optimizer_mode, config.landing_lambda) == (mode, 0.25)
    opt = make_optimizer(peft.get_peft_model(tiny_llama(), config), lr=1e-3)
    stiefel = [g for g in opt.param_groups if g.get("polar_role") == "stiefel"]
    assert {g["mode"] for g in stiefel} == {mode}
    if modes.MODES[mode].takes_lambda:
        assert {g["landing_lambda"] for g in stiefel} == {0.25}


def test_a_config_naming_an_unknown_mode_loads_and_make_optimizer_refuses_it(tmp_path: Path) -> None:
    # e.g. an adapter saved by a newer polar with a mode this version lacks: inference must still work.
    config = PolarConfig.from_pretrained(str(_saved_config(tmp_path, optimizer_mode="future_mode")))
    model = peft.get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match=r"adapter 'default'.*optimizer_mode='future_mode'.*valid modes: .*riemannian"):
        make_optimizer(model, lr=1e-3)
    # an explicit mode overrides the stored one
    assert {g["mode"] for g in make_optimizer(model, lr=1e-3, mode="landing").param_groups if "mode" in g} == {"landing"}


@pytest.mark.parametrize("fields, message", [
    ({"optimizer_mode": 3}, "optimizer_mode must be the name"),
    ({"optimizer_mode": ""}, "optimizer_mode must be the name"),
    ({"landing_lambda": -1.0}, "landing_lambda must be ≥ 0"),
    ({"landing_lambda": math.nan}, "landing_lambda must be a finite number"),
    ({"landing_lambda": "0.1"}, "landing_lambda must be ≥ 0"),
    ({"landing_lambda": True}, "landing_lambda must be ≥ 0"),
])
def test_polar_config_still_checks_the_types(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolarConfig(r=2, target_modules=TARGETS, **fields)


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _load_time_imports(path: Path, root: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports when it is loaded: statements outside functions (module body,
    class bodies, ``if`` / ``try`` / ``with`` blocks), not ``if TYPE_CHECKING:``; relative imports resolved."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            found.update(_names_imported(node, package))  # "m.a" kept only where a module
            for child in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, child, None)
                if isinstance(block, list) and block and isinstance(block[0], (ast.stmt, ast.excepthandler)):
                    visit(block)
            if isinstance(node, ast.ExceptHandler):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return (found & known) - {name}


def import_cycle(folder: Path) -> list[str] | None:
    """One cycle of load-time imports among the modules under ``folder`` (``a -> b -> ... -> a``), or None."""
    files = {_module_name(p, folder.parent): p for p in sorted(folder.rglob("*.py"))}
    graph = {m: sorted(_load_time_imports(p, folder.parent, set(files))) for m, p in files.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := walk(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in graph:
        if module not in state and (cycle := walk(module)):
            return cycle
    return None


def test_no_import_cycle_in_polar() -> None:
    cycle = import_cycle(ROOT / "polar")
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    """The check above can fail: a package whose modules import each other at load time is reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from pkg import c\n"
                              "def f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("class C:\n    from pkg.a import b\n")
    assert import_cycle(pkg) is None  # imports inside functions and under TYPE_CHECKING do not count
    (pkg / "b.py").write_text("try:\n    from .c import C\nexcept ImportError:\n    pass\n")
    assert import_cycle(pkg) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
