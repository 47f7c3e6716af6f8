"""``polar eval`` / ``polar lm-eval``: shipped GSM8K / MATH task overrides (prompt = the math recipe's training
prompt), answer extraction, results table, the lm-eval CLI with PoLAR registered, and the ``--help`` texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from helpers_train import MC_DOCS, save_tiny_llama, write_mc_task  # noqa: E402

from polar.cli import main  # noqa: E402
from polar.data.instruction import format_prompt  # noqa: E402
from polar.evaluation import TASKS_DIR, format_table  # noqa: E402

GSM8K_DOCS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
     "answer": "He has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "4 * 3 = 12\n#### 12"},
]


@pytest.fixture(scope="module")
def polar_adapter(tmp_path_factory):
    """A tiny Llama and an (untrained) PoLAR adapter over it, saved without the Trainer."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import polar

    root = tmp_path_factory.mktemp("evaltasks")
    base = save_tiny_llama(root / "llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, polar.PolarConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return root, base, adapter


def _local_task(folder: Path, include: Path, name: str, data: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(d) + "\n" for d in data))
    (folder / f"{name}.yaml").write_text(
        f"include: {include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\ntest_split: test\ntraining_split: null\n"
    )
    return folder


def test_gsm8k_alpaca_prompt_matches_training_template(tmp_path):
    from lm_eval.tasks import TaskManager

    folder = _local_task(tmp_path / "tasks", TASKS_DIR / "gsm8k_alpaca" / "gsm8k_alpaca.yaml", "gsm8k_local",
                         GSM8K_DOCS)
    manager = TaskManager(include_path=[str(TASKS_DIR), str(folder)], include_defaults=False)
    assert {"gsm8k_alpaca", "hendrycks_math_alpaca", "hendrycks_math_alpaca_algebra"} <= set(manager.all_tasks)
    task = manager.load(["gsm8k_local"])["tasks"]["gsm8k_local"]
    doc = next(iter(task.test_docs()))
    # the exact prompt `polar train --task math` trains on (MetaMathQA query -> Alpaca, no input)
    assert task.doc_to_text(doc) == format_prompt(GSM8K_DOCS[0]["question"], "", "alpaca")
    assert task.doc_to_target(doc) == "5"
    assert task.config.num_fewshot == 0


def test_math_answer_extraction():
    from polar.tasks.math_alpaca.utils import extract_answer, process_results

    assert extract_answer("We get 2x = 1, so x = 1/2.\nThe answer is: \\frac{1}{2}") == "\\frac{1}{2}"
    assert extract_answer("so the result is \\boxed{7}.") == "7"
    doc = {"solution": "Thus $x = \\boxed{\\frac{1}{2}}$."}
    assert process_results(doc, ["... The answer is: \\frac12"]) == {"exact_match": 1}
    assert process_results(doc, ["The answer is: 3"]) == {"exact_match": 0}


def test_eval_gsm8k_override_offline_with_polar_adapter(polar_adapter):
    root, base, adapter = polar_adapter
    folder = _local_task(root / "gsm_tasks", TASKS_DIR / "gsm8k_alpaca" / "gsm8k_alpaca.yaml", "gsm8k_local",
                         GSM8K_DOCS)
    # short generations keep the test fast
    text = (folder / "gsm8k_local.yaml").read_text()
    (folder / "gsm8k_local.yaml").write_text(
        text + "generation_kwargs:\n  until: ['### Instruction']\n  do_sample: false\n  max_gen_toks: 8\n")
    out = root / "gsm.json"
    assert main(["eval", str(adapter), "--tasks", "gsm8k_local", "--include-path", str(folder), "--limit", "2",
                 "--batch-size", "2", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    metrics = results["results"]["gsm8k_local"]
    assert "exact_match,strict-match" in metrics and "exact_match,flexible-extract" in metrics
    assert results["peft_type"] == "POLAR" and results["base_model"] == str(base)


def test_lm_eval_cli_with_polar_registered(polar_adapter, capsys):
    root, base, adapter = polar_adapter
    mc = root / "mc.json"
    mc.write_text(json.dumps(MC_DOCS))
    tasks = write_mc_task(root / "mc_tasks", mc)
    out = root / "lm_eval_out"
    code = main(["lm-eval", "run", "--model", "hf", "--model_args",
                 f"pretrained={base},peft={adapter}", "--device", "cpu", "--tasks", "tiny_mc", "--include_path",
                 str(tasks), "--batch_size", "2", "--output_path", str(out)])
    assert code == 0
    files = list(out.rglob("results_*.json"))
    assert files, "lm-eval wrote no results"
    results = json.loads(files[0].read_text())
    assert "acc,none" in results["results"]["tiny_mc"]
    # polar's task overrides are on lm-eval's include path inside `polar lm-eval`
    from lm_eval.tasks import TaskManager

    assert "gsm8k_alpaca" in TaskManager(include_defaults=False).all_tasks


def test_format_table():
    table = format_table({"results": {
        "boolq": {"acc": 0.75, "acc_stderr": 0.01},
        "gsm8k_alpaca": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1},
        "glue:mnli": {"dev_matched": {"accuracy": 0.8, "num_examples": 10}},
    }})
    assert "boolq" in table and "0.7500 ± 0.0100" in table and "0.5000 ± 0.1000" in table
    assert "glue:mnli (dev_matched)" in table and "num_examples" not in table


@pytest.mark.parametrize("command,expected", [
    ("train", ["--adapter", "--recipe", "--task", "--data-dir", "--response-only-loss", "--prompt-template",
               "--resume", "--overwrite", "--landing-lambda", "--gradient-checkpointing", "--report-to",
               "commonsense-llama2", "glue:rte", "json:PATH", "torchrun"]),
    ("eval", ["ADAPTER_DIR", "--tasks", "--num-fewshot", "--batch-size", "--limit", "--include-path",
              "--base-model", "--output", "gsm8k_alpaca"]),
])
def test_help_texts(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, word


def test_lm_eval_help_is_lm_evals(capsys):
    assert main(["lm-eval", "--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "train" in top and "eval" in top and "lm-eval" in top
