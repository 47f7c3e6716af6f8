"""Run PEFT's own test matrix on PoLAR: ``make peft-conformance``.

PEFT holds every method to ``tests/test_custom_models.py`` (with ``testing_common.py``). This script

1. takes the sdist of the PEFT version installed in this environment from the package index (cached under
   ``.cache/peft-<version>/``; PEFT's code is never committed here),
2. copies its test files into a package ``peft_tests`` and appends PoLAR's rows (``polar_peft_cases.py``) to the
   matrix lists of the same name, right where each list is defined, so the parametrisation picks them up,
3. runs the PoLAR cases (``-k PoLAR``) and checks the outcome against ``peft_skips.yaml``: no failure or error, every
   skip listed there with its reason, no listed skip that no longer happens, and every PoLAR row exercised.

Exit status 0 only when all of that holds. Extra arguments are passed to pytest (e.g. ``-x``, ``-k 'PoLAR and merge'``).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / ".cache"
TEST_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
# The lists of test_custom_models.py that PoLAR adds rows to (the names match polar_peft_cases.py).
MATRIX_LISTS = ("TEST_CASES", "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", "MIXED_ADAPTER_TEST_CASES")
SELECT = "PoLAR"
PYTEST_INI = """[pytest]
markers =
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    regression: whether to run regression suite test
    bitsandbytes: select bitsandbytes integration tests
"""


def fetch_tests(version: str) -> Path:
    """PEFT's tests/ of ``version``, from the cached sdist (downloaded once from the package index)."""
    target = CACHE / f"peft-{version}" / "tests"
    if all((target / name).is_file() for name in TEST_FILES):
        return target
    sdist_dir = CACHE / "sdist"
    sdist = sdist_dir / f"peft-{version}.tar.gz"
    if not sdist.is_file():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        print(f"peft-conformance: downloading the sdist of peft=={version} into {sdist_dir}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"peft=={version}", "-d", str(sdist_dir)],
            check=True,
        )
    if not sdist.is_file():
        raise SystemExit(f"peft-conformance: pip did not leave {sdist}; the package index may lack peft=={version}'s sdist.")
    staging = Path(tempfile.mkdtemp(prefix="peft-tests-", dir=CACHE))
    with tarfile.open(sdist) as archive:
        prefix = f"peft-{version}/tests/"
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
        if not members:
            raise SystemExit(f"peft-conformance: {sdist} holds no {prefix}; PEFT's sdist no longer ships its tests.")
        for member in members:
            member.name = member.name[len(prefix):]
            archive.extract(member, staging, filter="data")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)  # atomic: a half-extracted tests/ is never taken for the cache
    return target


def inject_cases(source: str) -> str:
    """``source`` with ``NAME += polar_peft_cases.NAME`` after the definition of each list in MATRIX_LISTS."""
    lines = source.splitlines(keepends=True)
    for name in MATRIX_LISTS:
        start = next((i for i, line in enumerate(lines) if line.startswith(f"{name} = [")), None)
        if start is None:
            raise SystemExit(f"peft-conformance: test_custom_models.py has no '{name} = [' list; PEFT's layout changed.")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].rstrip() == "]"), None)
        if end is None:
            raise SystemExit(f"peft-conformance: the list {name} of test_custom_models.py does not end with ']'.")
        lines.insert(end + 1, f"{name} += polar_peft_cases.{name}  # PoLAR's rows (polar-peft conformance)\n")
    first_import = next(i for i, line in enumerate(lines) if re.match(r"(import|from) ", line))
    lines.insert(first_import, "import polar_peft_cases\n")
    return "".join(lines)


def build_run_dir(tests: Path, version: str) -> Path:
    run_dir = CACHE / f"peft-{version}" / "run"
    package = run_dir / "peft_tests"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in TEST_FILES:
        text = (tests / name).read_text()
        if name == "test_custom_models.py":
            text = inject_cases(text)
        (package / name).write_text(text)
    (run_dir / "pytest.ini").write_text(PYTEST_INI)
    return run_dir


def load_skips(path: Path, version: str) -> list[dict[str, str]]:
    """The entries of the skip list that apply to PEFT ``version``: an entry's optional ``peft`` is a version
    specifier (``">=0.22"``) naming the releases whose matrix has that test; without it the entry applies to all."""
    entries = yaml.safe_load(path.read_text()) or []
    applicable = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("test") or not entry.get("reason"):
            raise SystemExit(f"peft-conformance: every entry of {path} needs 'test' (a pattern) and 'reason': {entry!r}")
        try:
            releases = SpecifierSet(entry.get("peft", ""))
        except InvalidSpecifier as err:
            raise SystemExit(f"peft-conformance: {path}: 'peft' of {entry['test']!r} is not a version specifier: {err}")
        if releases.contains(version, prereleases=True):
            applicable.append(entry)
    return applicable


def read_outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, message)} from pytest's JUnit XML; outcome is passed, failed, error or skipped."""
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = node.get("message", "") or (node.text or "")
                break
        outcomes[test_id] = (outcome, message)
    return outcomes


def matches(test_id: str, pattern: str) -> bool:
    """Glob match where only ``*`` and ``?`` are wild: test ids hold ``[...]`` parameters literally."""
    return fnmatch.fnmatchcase(test_id, pattern.replace("[", "[[]"))


def check(outcomes: dict[str, tuple[str, str]], skips: list[dict[str, str]], row_names: list[str]) -> list[str]:
    """The problems with a run, each as one line; empty when the conformance holds."""
    problems = []
    for test_id, (outcome, message) in sorted(outcomes.items()):
        if outcome in ("failed", "error"):
            problems.append(f"{outcome}: {test_id}: {message.splitlines()[0] if message else ''}")
    skipped = {test_id: message for test_id, (outcome, message) in outcomes.items() if outcome == "skipped"}
    for test_id, message in sorted(skipped.items()):
        if not any(matches(test_id, entry["test"]) for entry in skips):
            problems.append(f"skip not listed in peft_skips.yaml: {test_id}: {message}")
    for entry in skips:
        if not any(matches(test_id, entry["test"]) for test_id in skipped):
            problems.append(f"listed skip no longer skipped (remove it from peft_skips.yaml): {entry['test']}")
    ran = [test_id for test_id, (outcome, _) in outcomes.items() if outcome == "passed"]
    for row in row_names:
        if not any(row in test_id for test_id in ran):
            problems.append(f"PoLAR row {row!r} passed no test of the matrix: is it still collected?")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skips", type=Path, default=HERE / "peft_skips.yaml", help="the committed skip list")
    args, pytest_args = parser.parse_known_args(argv)
    version = importlib.metadata.version("peft")
    run_dir = build_run_dir(fetch_tests(version), version)
    junit = run_dir / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(run_dir / "pytest.ini"),
               "--rootdir", str(run_dir), f"--junitxml={junit}", "-k", SELECT,
               str(run_dir / "peft_tests" / "test_custom_models.py"), *pytest_args]
    print(f"peft-conformance: PEFT {version}'s test_custom_models.py with PoLAR's rows", flush=True)
    returncode = subprocess.run(command, cwd=run_dir, env=env).returncode
    if not junit.is_file():
        print(f"peft-conformance: pytest wrote no report (exit {returncode})", file=sys.stderr)
        return returncode or 1
    sys.path.insert(0, str(HERE))
    import polar_peft_cases

    rows = [row[0] for name in MATRIX_LISTS for row in getattr(polar_peft_cases, name)]
    narrowed = "-k" in pytest_args or "-x" in pytest_args or "--exitfirst" in pytest_args
    outcomes = read_outcomes(junit)
    problems = check(outcomes, load_skips(args.skips, version), [] if narrowed else rows)
    if narrowed:  # a narrowed run cannot judge the skip list or the rows it did not select
        problems = [p for p in problems if p.startswith(("failed", "error"))]
    counts = {kind: sum(o == kind for o, _ in outcomes.values()) for kind in ("passed", "failed", "error", "skipped")}
    print("peft-conformance: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 0 if not problems and returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
