"""Offline end to end for classification: tiny BERT, ``polar train --task glue:rte`` on a GLUE-format TSV folder
(classifier head saved with the adapter), then ``polar eval`` on the dev TSV with the GLUE metrics."""

from __future__ import annotations

import json

import pytest

from helpers_train import save_tiny_bert, write_rte_folder

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
                 "--target-modules", "query,value", "--landing-lambda", "1.0", "--lr", "1e-3",
                 "--weight-decay", "0.01", "--logging-steps", "1"])
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
    assert results["kind"] == "glue" and metrics["num_examples"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0


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
    assert set(metrics) >= {"pearson", "spearman"}
