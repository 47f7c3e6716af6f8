"""benchmarks/ as a suite: the import graph (no cycle; suites never import each other, only the harness and
their own section modules), the harness's result file (machine, package versions, commit), and a suite run as a
file (``python benchmarks/bench_landing.py``) at its smallest size writing its report and result file."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.harness.results import write_result
from polar.io import utc_timestamp

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# section modules: the parts of one suite that its command runs (``bench_landing.py --sections peers``)
SECTION_OF = {"bench_peers": "bench_landing", "bench_smollm2": "bench_landing", "gpu_check_models": "gpu_check"}


def import_graph(bench: Path) -> dict[str, set[str]]:
    """Module (``bench_landing``, ``harness.measure``) → the benchmarks modules it imports, anywhere in its body
    (function-level imports included); bare sibling imports (``from bench_landing import``) count too."""
    modules = {p.relative_to(bench).with_suffix("").as_posix().replace("/", "."): p for p in bench.rglob("*.py")}
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.rsplit(".", 1)[0] if "." in name else ""
        if path.name == "__init__.py":
            package = name
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .fixtures import X / from . import fixtures
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if package else ""
                    mod = ".".join(x for x in (base, node.module) if x)
                else:
                    mod = node.module or ""
                targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            for target in targets:
                target = target.removeprefix("benchmarks.").removeprefix("benchmarks")
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges - {""}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def wrong_edges(graph: dict[str, set[str]]) -> list[str]:
    """Imports a suite may not make: the harness imports only the harness; a section module only the harness; a
    suite the harness and its own section modules."""
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if target == "harness" or target.startswith("harness."):
                continue
            if module.startswith("harness") or module in SECTION_OF or SECTION_OF.get(target) != module:
                bad.append(f"{module} imports {target}")
    return bad


def test_no_import_cycle_and_suites_do_not_import_each_other():
    graph = import_graph(BENCH)
    assert {"bench_landing", "gpu_check", "harness.measure", "harness.fixtures", "harness.results"} <= set(graph)
    assert cycle(graph) is None, cycle(graph)
    assert wrong_edges(graph) == []
    assert "harness.measure" in graph["bench_peers"] and "harness.checks" in graph["gpu_check_models"]


def test_the_graph_check_catches_a_cycle_and_a_suite_importing_a_suite(tmp_path):
    # the shape benchmarks/ had: timers imported from a suite by its section module, sections importing back
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "__init__.py").write_text("")
    (tmp_path / "harness" / "measure.py").write_text("")
    (tmp_path / "bench_landing.py").write_text("def f():\n    from bench_peers import g\n")
    (tmp_path / "bench_peers.py").write_text("from bench_landing import time_interleaved\n")
    (tmp_path / "glue_minilm.py").write_text("from benchmarks.harness.measure import fmt_t\n"
                                             "from benchmarks import bench_landing\n")
    graph = import_graph(tmp_path)
    assert cycle(graph) in (["bench_landing", "bench_peers", "bench_landing"], ["bench_peers", "bench_landing", "bench_peers"])
    assert sorted(wrong_edges(graph)) == ["bench_peers imports bench_landing", "glue_minilm imports bench_landing"]


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def assert_provenance(record: dict) -> None:
    machine, versions = record["machine"], record["versions"]
    assert machine["cpu"] and machine["cpu_count"] >= 1 and machine["threads"] >= 1 and "gpu" in machine
    assert all(versions[k] for k in ("python", "torch", "transformers", "peft", "polar-peft")), versions
    assert record["commit"] == git_head() and isinstance(record["dirty"], bool)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["finished"])


def test_result_file_holds_machine_versions_and_commit(tmp_path):
    path = write_result(tmp_path / "r.json", "demo_suite", {"figure": float("nan"), "ok": 1.5}, utc_timestamp(),
                        ["--fast"])
    record = json.loads(path.read_text())
    assert record["suite"] == "demo_suite" and record["command"] == "benchmarks/demo_suite.py --fast"
    assert record["results"] == {"figure": None, "ok": 1.5}  # strict JSON
    assert_provenance(record)


def test_a_suite_runs_as_a_file_and_writes_report_and_result(tmp_path):
    out = tmp_path / "landing.md"
    argv = ["--sections", "grid", "--ns", "32", "--rs", "4", "--target-s", "0", "--threads", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_landing.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = out.read_text()
    assert "### Per-factor cost (fp32, median)" in report and "| 32 | 4 |" in report
    record = json.loads((tmp_path / "landing.md.json").read_text())
    assert record["suite"] == "bench_landing" and record["command"].endswith(f"--out {out}")
    assert "| 32 | 4 |" in record["results"]["Per-factor cost (fp32, median)"]
    assert_provenance(record)
