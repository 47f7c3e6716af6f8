"""Offline end to end for classification: tiny BERT, ``polar train --task glue:rte`` on a GLUE-format TSV folder
(classifier head saved with the adapter), then ``polar eval`` on the dev TSV with the GLUE metrics."""

from __future__ import annotations

import json

import pytest

from helpers_train import glue_accuracy, save_tiny_bert, write_rte_folder

from polar.cli import main


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("bert") / "bert"))


@pytest.mark.parametrize("adapter", ["polar", "lora"])
def test_glue_rte_train_eval(bert, tmp_path, adapter, capsys):
    data = write_rte_folder(tmp_path / "RTE")
    out = tmp_path / "run"
    code = main(["train", "--model", bert, "--task", "glue:rte", "--data-dir", str(data), "--adapter", adapter,
                 "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--r", "4", "--alpha", "4",
                 "--target-modules", "query,value", "--lr", "1e-3", "--weight-decay", "0.01", "--logging-steps", "1",
                 *(["--optimizer-mode", "landing", "--landing-lambda", "1.0"] if adapter == "polar" else [])])
    assert code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("classifier" in k for k in keys)
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["task"] == "glue:rte" and run["resolved"]["num_examples"] == 16
    capsys.readouterr()
    # task and data folder come from run.json
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "glue:rte" in printed and "accuracy" in printed
    results = json.loads((out / "eval_results.json").read_text())
    metrics = results["results"]["glue:rte"]
    assert results["kind"] == "glue" and metrics["num_examples"] == 8
    assert metrics["accuracy"] == pytest.approx(glue_accuracy(out, data / "dev.tsv", ["entailment", "not_entailment"]))
    # --limit: a count takes the first N dev examples, a fraction the first ceil(f · n); others are refused
    assert main(["eval", str(out), "--limit", "0.3", "--output", str(tmp_path / "frac.json")]) == 0
    assert json.loads((tmp_path / "frac.json").read_text())["results"]["glue:rte"]["num_examples"] == 3
    assert main(["eval", str(out), "--limit", "5", "--output", str(tmp_path / "five.json")]) == 0
    assert json.loads((tmp_path / "five.json").read_text())["results"]["glue:rte"]["num_examples"] == 5
    capsys.readouterr()
    for bad in ("2.5", "0", "-1"):
        assert main(["eval", str(out), "--limit", bad, "--output", str(tmp_path / "bad.json")]) == 2
        assert "--limit" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_glue_stsb_regression(bert, tmp_path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = ["the man is happy .\ta person smiles .\t4.0", "the cat sat on the mat\tthe dog ran in the park\t0.5",
            "a b c\ta b c\t5.0", "is fire cold?\tthe sky is blue\t1.0"]
    body = "".join(f"{i}\tg\tf\t2012\t{i}\tn\tn\t{r}\n" for i, r in enumerate(rows * 2))
    (folder / "train.tsv").write_text(header + body)
    (folder / "dev.tsv").write_text(header + body)
    out = tmp_path / "run"
    assert main(["train", "--model", bert, "--task", "glue:stsb", "--data-dir", str(folder), "--output-dir",
                 str(out), "--max-steps", "2", "--batch-size", "4", "--r", "4", "--target-modules", "query,value"]) == 0
    assert main(["eval", str(out), "--output", str(tmp_path / "r.json")]) == 0
    metrics = json.loads((tmp_path / "r.json").read_text())["results"]["glue:stsb"]
    # the correlations equal those of predictions made here with PEFT directly (continuous scores: a check that
    # fails if evaluation scored anything but this adapter on these pairs)
    import numpy as np
    import torch
    from peft import PeftModel
    from scipy.stats import spearmanr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=1, problem_type="regression",
                                                              ignore_mismatched_sizes=True)  # a fresh 1-output head
    model = PeftModel.from_pretrained(base, str(out)).eval()
    pairs = [r.split("\t") for r in rows * 2]
    with torch.no_grad():
        preds = [float(model(**tokenizer(a, b, return_tensors="pt")).logits[0, 0]) for a, b, _ in pairs]
    gold = [float(score) for _, _, score in pairs]
    assert len(set(np.round(preds, 6))) > 1
    assert metrics["pearson"] == pytest.approx(float(np.corrcoef(preds, gold)[0, 1]), rel=1e-4, abs=1e-5)
    assert metrics["spearman"] == pytest.approx(float(spearmanr(preds, gold)[0]), rel=1e-4, abs=1e-5)
