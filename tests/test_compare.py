"""``polar compare`` and the per-question records ``polar eval`` keeps.

Hand-made per-question files (written by the evaluation's own writer) are compared against independent
computations: accuracies as plain means, the McNemar p from scipy's exact binomial test and from math.comb, the
bootstrap interval against a straightforward item-level bootstrap (another random stream) and the normal
approximation; then the refusals, the CLI's JSON and plot, and two real tiny-model evaluations (lm-eval and GLUE)
whose per-question records agree with an independent PEFT scoring."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from polar.cli import main
from polar.compare import compare_runs, mcnemar_exact
from polar.evaluation import write_samples


def _question_hash(task: str, doc_id: int, salt: str = "") -> str:
    return hashlib.sha256(f"{task}/{doc_id}{salt}".encode()).hexdigest()


def write_run(path: Path, per_task: dict[str, dict[str, list[int]]], salt: str = "") -> Path:
    """A results JSON at ``path`` with per-question records: ``per_task[task][metric]`` = 0/1 per question."""
    records = {}
    for task, metrics in per_task.items():
        n = len(next(iter(metrics.values())))
        records[task] = [{"task": task, "doc_id": i, "doc_hash": _question_hash(task, i, salt),
                          "prompt_hash": _question_hash(task, i), "target": 0,
                          "metrics": {m: float(v[i]) for m, v in metrics.items()}} for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = write_samples(path, records)
    path.write_text(json.dumps({"kind": "lm-eval", "results": {}, "samples": samples}))
    return path


def correlated(n: int, p: float, flip: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Two 0/1 vectors that agree except on about ``flip`` of the questions (so pairing matters)."""
    a = [int(rng.random() < p) for _ in range(n)]
    b = [1 - x if rng.random() < flip else x for x in a]
    return a, b


def naive_stratified_bootstrap(per_task: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Item-level bootstrap written out plainly: per resample, per task, draw question indices with replacement;
    pooled = mean of the task means."""
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(per_task)))
    for r in range(resamples):
        for t, d in enumerate(per_task):
            out[r, t] = d[rng.integers(0, len(d), len(d))].mean()
    return out


def mcnemar_by_comb(b: int, c: int) -> float:
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n) if n else 1.0


@pytest.fixture
def pair(tmp_path):
    rng = random.Random(7)
    tasks = {"alpha": (240, 0.6, 0.15), "beta": (160, 0.45, 0.2)}
    a, b = {}, {}
    for task, (n, p, flip) in tasks.items():
        acc_a, acc_b = correlated(n, p, flip, rng)
        norm_a, norm_b = correlated(n, p, flip, rng)
        a[task], b[task] = {"acc": acc_a, "acc_norm": norm_a}, {"acc": acc_b, "acc_norm": norm_b}
    return write_run(tmp_path / "a" / "eval_results.json", a), write_run(tmp_path / "b.json", b), a, b


def test_single_pair_against_independent_computations(pair):
    from scipy.stats import binomtest

    path_a, path_b, a, b = pair
    result = compare_runs([[path_a.parent], [path_b]], resamples=4000, seed=3)
    rows = {(r["task"], r["metric"]): r for r in result["comparisons"][0]["rows"]}
    assert set(rows) == {(t, m) for t in ("alpha", "beta", "pooled") for m in ("acc", "acc_norm")}
    d = {}
    for task in ("alpha", "beta"):
        for metric in ("acc", "acc_norm"):
            row, xa, xb = rows[task, metric], np.array(a[task][metric]), np.array(b[task][metric])
            assert row["n"] == len(xa) and row["a"] == pytest.approx(xa.mean()) and row["b"] == pytest.approx(xb.mean())
            assert row["diff"] == pytest.approx(xb.mean() - xa.mean())
            only_a, only_b = int(((xa == 1) & (xb == 0)).sum()), int(((xa == 0) & (xb == 1)).sum())
            assert (row["mcnemar"]["a_only"], row["mcnemar"]["b_only"]) == (only_a, only_b)
            assert row["mcnemar"]["p"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)
            d[task, metric] = xb - xa
    for metric in ("acc", "acc_norm"):
        boot = naive_stratified_bootstrap([d["alpha", metric], d["beta", metric]], 3000, seed=11)
        for col, task in enumerate(("alpha", "beta")):
            low, high = np.quantile(boot[:, col], [0.025, 0.975])
            assert rows[task, metric]["low"] == pytest.approx(low, abs=0.01)
            assert rows[task, metric]["high"] == pytest.approx(high, abs=0.01)
            # and the normal approximation of the paired difference (much narrower than an unpaired one here)
            half = 1.96 * d[task, metric].std(ddof=1) / math.sqrt(len(d[task, metric]))
            assert rows[task, metric]["high"] - rows[task, metric]["low"] == pytest.approx(2 * half, abs=0.012)
        pooled, low_high = rows["pooled", metric], np.quantile(boot.mean(axis=1), [0.025, 0.975])
        assert pooled["diff"] == pytest.approx((d["alpha", metric].mean() + d["beta", metric].mean()) / 2)
        assert pooled["n"] == 400 and (pooled["low"], pooled["high"]) == pytest.approx(tuple(low_high), abs=0.008)
        b_sum = rows["alpha", metric]["mcnemar"]["a_only"] + rows["beta", metric]["mcnemar"]["a_only"]
        c_sum = rows["alpha", metric]["mcnemar"]["b_only"] + rows["beta", metric]["mcnemar"]["b_only"]
        assert pooled["mcnemar"]["p"] == pytest.approx(binomtest(b_sum, b_sum + c_sum, 0.5).pvalue, rel=1e-9)
    # reproducible for a seed, and the seed matters
    again = compare_runs([[path_a.parent], [path_b]], resamples=4000, seed=3)
    assert again["comparisons"] == result["comparisons"]
    other = compare_runs([[path_a.parent], [path_b]], resamples=4000, seed=4)
    assert other["comparisons"][0]["rows"][0]["low"] != result["comparisons"][0]["rows"][0]["low"]
    # a task's interval does not depend on the other tasks in the comparison
    alone = compare_runs([[path_a.parent], [path_b]], tasks=["alpha"], resamples=4000, seed=3)
    assert alone["comparisons"][0]["rows"][0] == rows["alpha", "acc"]


def test_mcnemar_exact_against_comb_and_scipy():
    from scipy.stats import binomtest

    for b, c in [(0, 0), (0, 5), (3, 9), (12, 16), (40, 41), (7, 0), (250, 300)]:
        p = mcnemar_exact(b, c)
        assert p == pytest.approx(mcnemar_by_comb(b, c), rel=1e-12)
        if b + c:
            assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_groups_of_seeds_are_averaged_per_question(tmp_path):
    rng = random.Random(1)
    n = 300
    base = [int(rng.random() < 0.55) for _ in range(n)]
    seeds_a = [[1 - x if rng.random() < 0.1 else x for x in base] for _ in range(3)]
    seeds_b = [[1 - x if rng.random() < 0.12 else x for x in base] for _ in range(2)]
    runs_a = [write_run(tmp_path / f"a{k}.json", {"t": {"acc": v}}) for k, v in enumerate(seeds_a)]
    runs_b = [write_run(tmp_path / f"b{k}.json", {"t": {"acc": v}}) for k, v in enumerate(seeds_b)]
    result = compare_runs([runs_a, runs_b], labels=["lora", "polar"], resamples=4000, seed=0)
    (row,) = result["comparisons"][0]["rows"]
    mean_a, mean_b = np.mean(seeds_a, axis=0), np.mean(seeds_b, axis=0)
    assert row["a"] == pytest.approx(mean_a.mean()) and row["b"] == pytest.approx(mean_b.mean())
    assert row["a_runs"] == pytest.approx([np.mean(s) for s in seeds_a]) and row["runs_b"] == 2
    assert row["mcnemar"] is None  # McNemar only for single runs
    boot = naive_stratified_bootstrap([mean_b - mean_a], 3000, seed=5)[:, 0]
    assert (row["low"], row["high"]) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=0.006)
    assert result["sides"][0] == {"label": "lora", "runs": [str(p) for p in runs_a]}


def test_a_grid_side_has_one_run_per_task_and_seed(tmp_path):
    """A benchmark grid writes one run per task and seed: a side's runs that scored a task are its replicates."""
    rng = random.Random(2)
    data = {(side, task, s): [int(rng.random() < 0.5) for _ in range(50)]
            for side in "ab" for task in ("x", "y") for s in range(2)}
    sides = [[write_run(tmp_path / f"{side}-{task}-{s}.json", {task: {"acc": data[side, task, s]}})
              for task in ("x", "y") for s in range(2)] for side in "ab"]
    result = compare_runs(sides, resamples=1000)
    rows = {r["task"]: r for r in result["comparisons"][0]["rows"]}
    for task in ("x", "y"):
        expected = np.mean([data["b", task, s] for s in range(2)]) - np.mean([data["a", task, s] for s in range(2)])
        assert rows[task]["diff"] == pytest.approx(expected) and rows[task]["runs_a"] == 2
    assert rows["pooled"]["diff"] == pytest.approx((rows["x"]["diff"] + rows["y"]["diff"]) / 2)
    assert rows["pooled"]["tasks"] == ["x", "y"]


def test_refusals_name_the_runs_tasks_and_counts(tmp_path, pair):
    path_a, path_b, a, _b = pair
    fewer = write_run(tmp_path / "fewer.json", {t: {m: v[:100] for m, v in a[t].items()} for t in a})
    with pytest.raises(ValueError, match=r"task alpha: .*a scored 240 questions, .*fewer\.json 100 \(100 doc ids"):
        compare_runs([[path_a], [fewer]])
    changed = write_run(tmp_path / "changed.json", a, salt="other data")
    with pytest.raises(ValueError, match=r"task alpha, doc 0: the question differs .*doc_hash"):
        compare_runs([[path_a], [changed]])
    one_task = write_run(tmp_path / "one.json", {"alpha": a["alpha"]})
    with pytest.raises(ValueError, match=r"different tasks \(A: alpha, beta; B: alpha\).*--tasks"):
        compare_runs([[path_a], [one_task]])
    assert compare_runs([[path_a], [one_task]], tasks=["alpha"], resamples=200)["comparisons"][0]["rows"][0]["n"] == 240
    with pytest.raises(ValueError, match=r"side B has no run scoring beta"):
        compare_runs([[path_a], [one_task]], tasks=["beta"])
    graded = write_run(tmp_path / "graded.json", {"alpha": {"acc": [0.5] * 240}})
    with pytest.raises(ValueError, match=r"metric 'acc' is 0.5; polar compare pairs right/wrong"):
        compare_runs([[one_task], [graded]], metrics=["acc"])
    with pytest.raises(ValueError, match=r"task alpha: not every question .* metric exact_match \(available: acc, "):
        compare_runs([[path_a], [path_b]], metrics=["exact_match"])
    with pytest.raises(ValueError, match=r"side 1 lists .* twice"):
        compare_runs([[path_a, path_a.parent], [path_b]])
    with pytest.raises(ValueError, match="at least two sides"):
        compare_runs([[path_a]])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kind": "lm-eval", "results": {"alpha": {"acc": 0.5}}}))
    with pytest.raises(ValueError, match=r"old\.json lists no per-question records .* `polar eval`"):
        compare_runs([[old], [path_b]])
    # a per-question file rewritten after its results JSON (e.g. by an unfinished later evaluation)
    sample_file = path_b.with_name("b_samples_alpha.jsonl")
    sample_file.write_text(sample_file.read_text().replace('"acc": 1.0', '"acc": 0.0', 1))
    with pytest.raises(ValueError, match=r"b_samples_alpha\.jsonl is not the file b\.json recorded for task alpha"):
        compare_runs([[path_a], [path_b]])
    with pytest.raises(FileNotFoundError, match="no such results file"):
        compare_runs([[tmp_path / "nowhere"], [path_a]])


def test_cli_json_text_and_plot(tmp_path, pair, capsys):
    path_a, path_b, _a, _b = pair
    plot = tmp_path / "forest.png"
    assert main(["compare", "--a", str(path_a.parent), "--b", str(path_b), "--json", "--seed", "5",
                 "--resamples", "2000", "--plot", str(plot)]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = compare_runs([[path_a.parent], [path_b]], resamples=2000, seed=5)
    assert printed["comparisons"] == expected["comparisons"] and printed["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert main(["compare", str(path_a.parent), str(path_b), "--labels", "LoRA,PoLAR", "--metric", "acc",
                 "--resamples", "2000", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    alpha = next(r for r in expected["comparisons"][0]["rows"] if (r["task"], r["metric"]) == ("alpha", "acc"))
    assert "PoLAR − LoRA, acc" in text and "acc_norm" not in text
    line = next(line for line in text.splitlines() if line.startswith("alpha"))
    assert f"{100 * alpha['diff']:+.2f}" in line and f"[{100 * alpha['low']:+.2f}, {100 * alpha['high']:+.2f}]" in line
    assert f"{alpha['mcnemar']['a_only']} / {alpha['mcnemar']['b_only']}" in line
    assert "pooled (2 tasks)" in text
    assert main(["compare", str(path_a), "--a", str(path_a), "--b", str(path_b)]) == 2
    assert "either as --a RUNS --b RUNS or as positional" in capsys.readouterr().err
    assert main(["compare", str(path_a), str(path_b), "--plot", str(tmp_path / "x.jpg")]) == 2
    assert "must end in .png, .svg or .pdf" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real evaluations
def _random_polar_adapter(base: str, out: Path, scale: float, seed: int, task_type: str | None = None) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import polar

    torch.manual_seed(seed)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
        config = polar.PolarConfig(r=4, alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        config = polar.PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "polar_theta" in name:
                param.copy_(scale * torch.randn(param.shape))
    model.save_pretrained(out)
    if task_type == "SEQ_CLS":  # as `polar train` does; the independent GLUE scoring reads it from the adapter
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def test_two_real_lm_eval_runs_compared(tmp_path, one_thread):
    pytest.importorskip("lm_eval")
    from helpers_train import mc_correctness, save_tiny_llama, write_mc_task

    from polar.evaluation import evaluate

    llama = str(save_tiny_llama(tmp_path / "llama"))
    words = "sky fire cat dog mat park man person a b c d".split()
    docs = [{"question": f"is the {w} blue?", "choices": ["yes", "no", words[(i + 3) % 12]], "label": i % 3}
            for i, w in enumerate(words)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    tasks = write_mc_task(tmp_path / "tasks", tmp_path / "docs.json", name="tiny_mc12")
    correct = {}
    for name, seed in (("one", 0), ("two", 1)):
        adapter = _random_polar_adapter(llama, tmp_path / name, 30.0, seed)
        result = evaluate(adapter, tasks="tiny_mc12", include_path=str(tasks), batch_size=4)
        entry = result["samples"]["tasks"]["tiny_mc12"]
        assert entry["file"] == "eval_results_samples_tiny_mc12.jsonl" and entry["n"] == 12
        rows = [json.loads(line) for line in (adapter / entry["file"]).read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == list(range(12)) and [r["target"] for r in rows] == [d["label"] for d in docs]
        assert all(len(r["scores"]) == 3 and len(r["doc_hash"]) == 64 for r in rows)
        # per question: lm-eval's acc is the argmax of its choice scores, and agrees with an independent scoring
        assert [r["metrics"]["acc"] for r in rows] == [float(np.argmax(r["scores"]) == r["target"]) for r in rows]
        correct[name] = mc_correctness(llama, adapter, docs)
        assert [r["metrics"]["acc"] for r in rows] == correct[name]
        assert np.mean(correct[name]) == pytest.approx(result["results"]["tiny_mc12"]["acc"])
    assert correct["one"] != correct["two"]  # so the comparison below has something to find
    result = compare_runs([[tmp_path / "one"], [tmp_path / "two"]], resamples=1000)
    row = next(r for r in result["comparisons"][0]["rows"] if r["metric"] == "acc")
    xa, xb = np.array(correct["one"]), np.array(correct["two"])
    assert row["diff"] == pytest.approx(xb.mean() - xa.mean())
    assert row["mcnemar"]["p"] == pytest.approx(
        mcnemar_by_comb(int(((xa == 1) & (xb == 0)).sum()), int(((xa == 0) & (xb == 1)).sum())))
    # another --limit scores other questions: refused
    evaluate(tmp_path / "two", tasks="tiny_mc12", include_path=str(tasks), batch_size=4, limit=6,
             output=tmp_path / "two-limit6.json")
    with pytest.raises(ValueError, match=r"task tiny_mc12: .*one scored 12 questions, .*two-limit6\.json 6"):
        compare_runs([[tmp_path / "one"], [tmp_path / "two-limit6.json"]])


def test_glue_evaluation_keeps_per_question_records(tmp_path, one_thread):
    from helpers_train import glue_accuracy, save_tiny_bert, write_rte_folder

    from polar.evaluation import evaluate

    bert = str(save_tiny_bert(tmp_path / "bert"))
    data = write_rte_folder(tmp_path / "RTE", n_dev=8)
    for name, seed in (("one", 0), ("two", 3)):
        adapter = _random_polar_adapter(bert, tmp_path / name, 5.0, seed, task_type="SEQ_CLS")
        result = evaluate(adapter, tasks="glue:rte", data_dir=data, batch_size=4, device="cpu")
        entry = result["samples"]["tasks"]["glue:rte"]
        assert entry["file"] == "eval_results_samples_glue-rte.jsonl" and entry["n"] == 8
        rows = [json.loads(line) for line in (adapter / entry["file"]).read_text().splitlines()]
        assert [r["target"] for r in rows] == [0, 1] * 4  # entailment, not_entailment alternate
        assert [r["metrics"]["acc"] for r in rows] == [float(r["prediction"] == r["target"]) for r in rows]
        assert [r["prediction"] for r in rows] == [int(np.argmax(r["scores"])) for r in rows]
        accuracy = glue_accuracy(adapter, data / "dev.tsv", ["entailment", "not_entailment"])
        assert np.mean([r["metrics"]["acc"] for r in rows]) == pytest.approx(accuracy)
        assert result["results"]["glue:rte"]["accuracy"] == pytest.approx(accuracy)
    result = compare_runs([[tmp_path / "one"], [tmp_path / "two"]], resamples=500)
    (row,) = result["comparisons"][0]["rows"]
    assert row["task"] == "glue:rte" and row["metric"] == "acc" and row["n"] == 8
