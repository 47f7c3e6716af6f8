"""conformance/run_peft.py: how PoLAR's rows enter PEFT's matrix and how a run is judged (no download here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conformance"))
import run_peft  # noqa: E402

# The shape of PEFT's test_custom_models.py around the lists (a module docstring, imports, lists of tuples).
PEFT_LIKE = '''"""docstring"""
import torch

TEST_CASES = [
    ("Vanilla MLP 1 LoRA", "MLP", None, {}),
]
ALL = sorted(TEST_CASES)

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("LoRA Same", "lora", None, {}, {}),
]

MIXED_ADAPTER_TEST_CASES = [
    ("LoRA mixed adapter", None, None),
]
'''


def test_rows_are_appended_where_each_list_is_defined():
    namespace: dict = {}
    polar_rows = type(sys)("polar_peft_cases")
    polar_rows.TEST_CASES = [("Vanilla MLP 1 PoLAR", "MLP", None, {})]
    polar_rows.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [("PoLAR Same", "polar", None, {}, {})]
    polar_rows.MIXED_ADAPTER_TEST_CASES = [("PoLAR mixed adapter", None, None)]
    sys.modules["polar_peft_cases"] = polar_rows
    try:
        exec(compile(run_peft.inject_cases(PEFT_LIKE), "patched", "exec"), namespace)
    finally:
        del sys.modules["polar_peft_cases"]
    assert [row[0] for row in namespace["TEST_CASES"]] == ["Vanilla MLP 1 LoRA", "Vanilla MLP 1 PoLAR"]
    assert [row[0] for row in namespace["ALL"]] == ["Vanilla MLP 1 LoRA", "Vanilla MLP 1 PoLAR"]  # before later uses
    assert namespace["MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES"][-1][0] == "PoLAR Same"
    assert namespace["MIXED_ADAPTER_TEST_CASES"][-1][0] == "PoLAR mixed adapter"


def test_a_changed_peft_layout_is_refused_by_name():
    with pytest.raises(SystemExit, match="no 'MIXED_ADAPTER_TEST_CASES = \\[' list"):
        run_peft.inject_cases(PEFT_LIKE.replace("MIXED_ADAPTER_TEST_CASES = [", "OTHER = ["))


def test_judging_a_run():
    outcomes = {
        "T::test_a[Vanilla MLP 1 PoLAR-MLP]": ("passed", ""),
        "T::test_b[Vanilla MLP 1 PoLAR-MLP]": ("skipped", "not for this method"),
        "T::test_c[Vanilla MLP 1 PoLAR-MLP]": ("failed", "AssertionError: x\nmore"),
    }
    skips = [{"test": "T::test_b[*PoLAR*]", "reason": "r"}, {"test": "T::test_gone[*]", "reason": "r"}]
    problems = run_peft.check(outcomes, skips, ["Vanilla MLP 1 PoLAR", "PoLAR Same"])
    assert problems == [
        "failed: T::test_c[Vanilla MLP 1 PoLAR-MLP]: AssertionError: x",
        "listed skip no longer skipped (remove it from peft_skips.yaml): T::test_gone[*]",
        "PoLAR row 'PoLAR Same' passed no test of the matrix: is it still collected?",
    ]
    assert run_peft.check(outcomes, [], [])[1].startswith("skip not listed in peft_skips.yaml: T::test_b")
    # brackets in a pattern are literal, not a character class
    assert not run_peft.matches("T::test_b[x]", "T::test_b[xy]") and run_peft.matches("T::t[a-1]", "T::t[a-*]")


def test_the_committed_skip_list_reads_and_gives_every_entry_a_reason():
    for version in ("0.21.2", "0.22.0"):
        entries = run_peft.load_skips(run_peft.HERE / "peft_skips.yaml", version)
        assert entries and all(len(entry["reason"]) > 40 for entry in entries)


def test_a_skip_entry_applies_to_the_releases_it_names(tmp_path):
    path = tmp_path / "skips.yaml"
    path.write_text(
        '- test: "T::old[*]"\n  reason: r\n  peft: "<0.22"\n'
        '- test: "T::new[*]"\n  reason: r\n  peft: ">=0.22"\n'
        '- test: "T::all[*]"\n  reason: r\n'
    )
    assert [e["test"] for e in run_peft.load_skips(path, "0.21.2")] == ["T::old[*]", "T::all[*]"]
    assert [e["test"] for e in run_peft.load_skips(path, "0.22.0")] == ["T::new[*]", "T::all[*]"]
    path.write_text('- test: "T::x"\n  reason: r\n  peft: "newer than 0.22"\n')
    with pytest.raises(SystemExit, match="'peft' of 'T::x' is not a version specifier"):
        run_peft.load_skips(path, "0.22.0")
