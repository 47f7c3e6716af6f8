"""Data builders of ``polar train``: instruction files, GLUE TSVs and metrics, lm-eval commonsense texts, recipes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from polar.data import (
    COMMONSENSE_TASKS,
    CausalLMCollator,
    CausalLMDataset,
    Example,
    glue_metrics,
    load_glue,
    load_instruction_file,
    resolve_task,
)
from polar.data.glue import read_glue_tsv
from polar.data.instruction import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, format_prompt

# The shared data live beside the repository (../shared/data from its root), wherever it is cloned.
SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


# ------------------------------------------------------------------ instruction files
def test_alpaca_jsonl_and_templates(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"instruction": "Add.", "input": "2 3", "output": "5"}) + "\n\n"
        + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n"
        + json.dumps({"query": "1+1?", "response": "The answer is: 2"}) + "\n"
        + json.dumps({"prompt": "Q: x\nA:", "completion": " y"}) + "\n"
        + json.dumps({"text": "free text"}) + "\n"
    )
    ex = load_instruction_file(path)
    assert ex[0] == Example(ALPACA_WITH_INPUT.format(instruction="Add.", input="2 3"), "5")
    assert ex[1].prompt == ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert ex[2].prompt == ALPACA_NO_INPUT.format(instruction="1+1?") and ex[2].response == "The answer is: 2"
    assert ex[3] == Example("Q: x\nA:", " y")
    assert ex[4] == Example("", "free text")
    plain = load_instruction_file(path, template="plain")
    assert plain[0].prompt == "Add.\n2 3\n"
    custom = load_instruction_file(path, template="### Q: {instruction} {input}\n### A: ")
    assert custom[1].prompt == "### Q: Say hi. \n### A: "
    with pytest.raises(ValueError, match="unknown prompt template"):
        format_prompt("x", template="nonsense")


def test_instruction_file_errors_name_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: missing field 'output'"):
        load_instruction_file(path)
    path.write_text(json.dumps({"question": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: missing field 'instruction'.*fields present: question"):
        load_instruction_file(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        load_instruction_file(path)
    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(ValueError, match=r"arr\.json line 3 \(record 2\): missing field 'output'"):
        load_instruction_file(arr)
    with pytest.raises(FileNotFoundError):
        load_instruction_file(tmp_path / "missing.json")


def test_causal_dataset_response_only_and_collator():
    from helpers_train import make_tokenizer

    tok, fast = make_tokenizer()
    tokenizer = fast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]")
    examples = [Example("Question: is the sky blue? Answer:", " yes"), Example("", "the cat sat")]
    full = CausalLMDataset(examples, tokenizer, cutoff=64)
    assert full[0]["labels"] == full[0]["input_ids"] and full[0]["input_ids"][-1] == tokenizer.eos_token_id
    resp = CausalLMDataset(examples, tokenizer, cutoff=64, response_only=True)
    n_prompt = len(tokenizer("Question: is the sky blue? Answer:")["input_ids"])
    assert resp[0]["labels"][:n_prompt] == [-100] * n_prompt
    assert resp[0]["labels"][n_prompt:] == resp[0]["input_ids"][n_prompt:]
    assert resp[1]["labels"] == resp[1]["input_ids"]  # text-only records train on everything
    cut = CausalLMDataset(examples, tokenizer, cutoff=4)
    assert all(len(item["input_ids"]) <= 4 for item in cut.items)
    batch = CausalLMCollator(tokenizer.pad_token_id)([resp[0], resp[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


# ------------------------------------------------------------------ GLUE
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_glue_tsv_formats(tmp_path):
    from helpers_train import write_rte_folder

    rte = load_glue("glue:rte", "train", write_rte_folder(tmp_path / "RTE", 4, 2))["train"]
    assert rte[0].texts == ("the man is happy .", "a person smiles .") and rte[0].label == 0
    assert rte[1].label == 1  # not_entailment
    dev = load_glue("rte", "dev", tmp_path / "RTE")
    assert list(dev) == ["dev"] and len(dev["dev"]) == 2
    cola = _write(tmp_path / "cola.tsv", 'gj04\t1\t\tThe "sailors" rode.\ngj04\t0\t*\tRode the.\n')
    ex = read_glue_tsv("cola", cola)
    assert ex[0].texts == ('The "sailors" rode.',) and [e.label for e in ex] == [1, 0]
    stsb = _write(tmp_path / "stsb.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                  "sentence2\tscore\n0\tm\tf\t2012\t0\tn\tn\tA man.\tA person.\t4.750\n")
    assert read_glue_tsv("stsb", stsb)[0].label == pytest.approx(4.75)
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    header = "index\tsentence1\tsentence2\tgold_label\n"
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        _write(mnli / name, header + "0\ta\tb\tneutral\n1\tc\td\tcontradiction\n")
    dev = load_glue("glue:mnli", "dev", mnli)
    assert set(dev) == {"dev_matched", "dev_mismatched"} and [e.label for e in dev["dev_matched"]] == [1, 2]


def test_glue_errors(tmp_path):
    bad = _write(tmp_path / "bad.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(ValueError, match=r"bad\.tsv line 1: missing column 'sentence2'"):
        read_glue_tsv("rte", bad)
    bad = _write(tmp_path / "bad2.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"bad2\.tsv line 3: field 'label' has unknown label 'maybe'"):
        read_glue_tsv("rte", bad)
    bad = _write(tmp_path / "bad3.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\n")
    with pytest.raises(ValueError, match=r"bad3\.tsv line 2: missing field 'sentence2'"):
        read_glue_tsv("rte", bad)
    with pytest.raises(ValueError, match="glue:cola"):
        resolve_task("glue:colaa")
    with pytest.raises(FileNotFoundError, match="RTE/train.tsv"):
        load_glue("rte", "train", tmp_path)


def test_glue_metrics():
    m = glue_metrics("cola", [1, 0, 1, 1], [1, 0, 0, 1])
    assert set(m) == {"matthews_correlation", "accuracy"} and m["accuracy"] == 0.75
    assert glue_metrics("mrpc", [1, 1, 0, 0], [1, 0, 0, 0])["f1"] == pytest.approx(2 / 3)
    s = glue_metrics("stsb", [1.0, 2.0, 3.0], [1.5, 2.5, 2.9])
    assert s["pearson"] > 0.9 and s["spearman"] == pytest.approx(1.0)


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"GLUE TSVs not present at {SHARED_GLUE} (../shared/data/glue from the repository root)")
@pytest.mark.parametrize("task,folder", [("cola", "CoLA"), ("rte", "RTE"), ("sst2", "SST-2"), ("stsb", "STS-B")])
def test_real_glue_files(task, folder):
    if not (SHARED_GLUE / folder).is_dir():
        pytest.skip(f"{SHARED_GLUE / folder} absent")
    dev = load_glue(task, "dev", SHARED_GLUE / folder)["dev"]
    train = load_glue(task, "train", SHARED_GLUE / folder, limit=50)["train"]
    assert len(dev) > 100 and len(train) == 50


# ------------------------------------------------------------------ tasks and recipes
def test_resolve_task():
    assert resolve_task("boolq").kind == "commonsense"
    assert str(resolve_task("glue:SST-2")) == "glue:sst2"
    assert resolve_task("math").kind == "math"
    assert resolve_task("json:/x/y.jsonl").path == "/x/y.jsonl"
    assert resolve_task(None, "d.jsonl").kind == "json"
    assert resolve_task("lm-eval:copa").name == "copa"
    with pytest.raises(ValueError, match="valid tasks: boolq, piqa"):
        resolve_task("boolqq")


def test_recipes_load_with_reference_values():
    from polar.recipes import list_recipes, load_recipe
    from polar.training import RECIPE_KEYS, resolve_settings

    assert list_recipes() == ["commonsense-llama2", "glue-deberta", "math-gemma3"]
    cs = load_recipe("commonsense-llama2", valid_keys=RECIPE_KEYS)
    assert cs["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (cs["alpha"], cs["dropout"], cs["learning_rate"], cs["landing_lambda"]) == (32, 0.05, 4e-3, 5e-3)
    assert (cs["epochs"], cs["global_batch_size"], cs["scheduler"], cs["warmup"], cs["cutoff"]) == (
        5, 128, "cosine", 0.03, 512)
    assert cs["fp16"] is True and cs["weight_decay"] == 0.0
    assert load_recipe("commonsense-llama2", adapter="lora")["learning_rate"] == 4e-4
    glue = load_recipe("glue-deberta", valid_keys=RECIPE_KEYS)
    assert (glue["r"], glue["alpha"], glue["landing_lambda"], glue["weight_decay"]) == (8, 8, 1.0, 0.01)
    math = load_recipe("math-gemma3", valid_keys=RECIPE_KEYS)
    assert (math["r"], math["epochs"], math["learning_rate"], math["landing_lambda"], math["bf16"]) == (
        16, 2, 4e-3, 5e-3, True)
    s = resolve_settings(recipe="commonsense-llama2", task="boolq", output_dir="x", r=4, adapter="dora")
    assert s.r == 4 and s.learning_rate == 4e-4 and s.alpha == 32 and s.adapter == "dora"
    with pytest.raises(ValueError, match="shipped recipes: commonsense-llama2"):
        load_recipe("nope")


def test_recipe_unknown_key(tmp_path):
    from polar.recipes import load_recipe
    from polar.training import RECIPE_KEYS

    path = _write(tmp_path / "r.yaml", "r: 4\nlearning_rat: 1e-3\n")
    with pytest.raises(ValueError, match="unknown setting.*learning_rat"):
        load_recipe(path, valid_keys=RECIPE_KEYS)


# ------------------------------------------------------------------ commonsense from lm-eval task definitions
def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_commonsense_builder_uses_lm_eval_definitions(tmp_path):
    pytest.importorskip("lm_eval")
    from polar.data.commonsense import commonsense_examples, commonsense_texts

    assert len(COMMONSENSE_TASKS) == 8
    boolq = _jsonl(tmp_path / "boolq.jsonl", [
        {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
        {"question": "is fire cold", "passage": "Fire is hot.", "idx": 1, "label": 0},
    ])
    assert commonsense_texts("boolq", data_files=boolq) == [
        "The sky is blue.\nQuestion: is the sky blue?\nAnswer: yes",
        "Fire is hot.\nQuestion: is fire cold?\nAnswer: no",
    ]
    # WinoGrande: the option-filled sentence.
    wino = _jsonl(tmp_path / "wg.jsonl", [
        {"sentence": "The trophy doesn't fit into the suitcase because the _ is too big.", "option1": "trophy",
         "option2": "suitcase", "answer": "1"},
        {"sentence": "Sarah lent Maria a pen because _ had two.", "option1": "Sarah", "option2": "Maria",
         "answer": "1"},
    ])
    assert commonsense_texts("winogrande", data_files=wino) == [
        "The trophy doesn't fit into the suitcase because the trophy is too big.",
        "Sarah lent Maria a pen because Sarah had two.",
    ]
    siqa = _jsonl(tmp_path / "siqa.jsonl", [
        {"context": "Tracy went home.", "question": "Why?", "answerA": "tired", "answerB": "hungry",
         "answerC": "bored", "label": "2"},
    ])
    ex = commonsense_examples("social_iqa", data_files=siqa)[0]
    assert ex == Example("Q: Tracy went home. Why?\nA:", " hungry")
    arc = _jsonl(tmp_path / "arc.jsonl", [
        {"id": "a", "question": "Which is a metal?", "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
         "answerKey": "B"},
    ])
    assert commonsense_texts("arc_easy", data_files=arc) == ["Question: Which is a metal?\nAnswer: iron"]
    obqa = _jsonl(tmp_path / "obqa.jsonl", [
        {"id": "1", "question_stem": "The sun is", "choices": {"text": ["cold", "hot"], "label": ["A", "B"]},
         "answerKey": "B"},
    ])
    assert commonsense_texts("openbookqa", data_files=obqa) == ["The sun is hot"]
    # The same text as lm-eval's own request construction for the gold choice.
    from polar.data.commonsense import load_lm_eval_task

    task = load_lm_eval_task("boolq", data_files=boolq)
    doc = next(iter(task.training_docs()))
    gold = task.doc_to_choice(doc)[task.doc_to_target(doc)]
    expected = task.doc_to_text(doc) + task.config.target_delimiter + gold
    assert commonsense_texts("boolq", data_files=boolq)[0] == expected
    with pytest.raises(ValueError, match="commonsense tasks: boolq"):
        commonsense_texts("no_such_task_xyz", data_files=boolq)


def test_math_task_from_local_metamath_file(tmp_path):
    from polar.data import load_examples

    path = tmp_path / "MetaMathQA.json"
    path.write_text(json.dumps([
        {"query": "What is 2+3?", "response": "2+3=5. The answer is: 5", "type": "GSM_Rephrased"},
        {"query": "What is 4*3?", "response": "The answer is: 12", "type": "MATH_AnsAug"},
    ]))
    spec = resolve_task("math")
    examples = load_examples(spec, data_file=str(path), template="alpaca")
    assert examples[0] == Example(format_prompt("What is 2+3?", "", "alpaca"), "2+3=5. The answer is: 5")
    assert len(load_examples(spec, data_file=str(path), limit=1)) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("r: [1, 2\nalpha: 3\n", r"is not readable YAML \(line 2\)"),
        ("- r\n- alpha\n", "expected a mapping of settings, got list"),
        ("r: 4\nadapter_overrides: [polar]\n", "adapter_overrides must map an adapter name"),
        ("r: 4\nadapter_overrides:\n  lora: 3\n", "adapter_overrides must map an adapter name"),
    ],
)
def test_a_malformed_recipe_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    from polar.cli import main

    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--task", "boolq", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(recipe) in err and re.search(message, err), err
    assert not out.exists()
    from polar.recipes import load_recipe

    recipe.write_bytes(b"r: \xff\xfe\n")
    with pytest.raises(ValueError, match="is not readable YAML"):
        load_recipe(recipe)
