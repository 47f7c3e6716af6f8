"""Tiny offline models for the train / eval / data tests: a Llama and a BERT built from configs, with a
word-level tokenizer trained on the fly by the ``tokenizers`` library, saved to a folder."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "Question: is the sky blue? Answer: yes",
    "Question: is fire cold? Answer: no",
    "the cat sat on the mat and the dog ran in the park",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: add two and three . the answer is five",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "entailment not_entailment the man is happy . a person smiles .",
]


def make_tokenizer(vocab_extra: list[str] | None = None):
    """A word-level fast tokenizer with [PAD] [UNK] [CLS] [SEP] </s> specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "<s>"])
    tok.train_from_iterator(CORPUS + list(vocab_extra or []), trainer=trainer)
    return tok, PreTrainedTokenizerFast


def save_tiny_llama(path: str | Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok, fast_cls = make_tokenizer()
    tokenizer = fast_cls(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>", bos_token="<s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path: str | Path) -> Path:
    import torch
    from tokenizers import processors
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    tok, fast_cls = make_tokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer = fast_cls(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ALPACA_RECORDS = [
    {"instruction": "is the sky blue?", "input": "", "output": "yes"},
    {"instruction": "is fire cold?", "input": "", "output": "no"},
    {"instruction": "add two and three", "input": "a b c", "output": "the answer is five"},
    {"instruction": "the cat sat on the mat", "input": "", "output": "the dog ran in the park"},
] * 4


def write_rte_folder(folder: str | Path, n_train: int = 16, n_dev: int = 8) -> Path:
    """A GLUE-format RTE folder (index, sentence1, sentence2, label) with a few lines."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [
        ("the man is happy .", "a person smiles .", "entailment"),
        ("the cat sat on the mat", "the dog ran in the park", "not_entailment"),
    ]
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            s1, s2, label = pairs[i % 2]
            lines.append(f"{i}\t{s1}\t{s2}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def write_mc_task(folder: str | Path, data_file: str | Path, name: str = "tiny_mc") -> Path:
    """A local lm-eval multiple-choice task YAML over a JSON file of {question, choices, label} docs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yaml_text = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {Path(data_file).resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}} Answer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    (folder / f"{name}.yaml").write_text(yaml_text)
    return folder


MC_DOCS = [
    {"question": "is the sky blue?", "choices": ["yes", "no"], "label": 0},
    {"question": "is fire cold?", "choices": ["yes", "no"], "label": 1},
    {"question": "is the cat on the mat?", "choices": ["yes", "no"], "label": 0},
]


def mc_accuracy(base_dir: str | Path, adapter_dir: str | Path, docs: list[dict]) -> float:
    """Accuracy on ``write_mc_task``'s task computed without lm-eval (see :func:`mc_correctness`)."""
    correct = mc_correctness(base_dir, adapter_dir, docs)
    return sum(correct) / len(correct)


def mc_correctness(base_dir: str | Path, adapter_dir: str | Path, docs: list[dict]) -> list[float]:
    """Per-question correctness (1.0 / 0.0) on ``write_mc_task``'s task computed without lm-eval: base + adapter
    loaded with PEFT, each choice scored by the summed log-probability of its tokens after
    ``"Question: <q> Answer:"`` (the target delimiter is a space), the highest-scoring choice predicted (the first
    on ties)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import polar  # noqa: F401  (registers PoLAR)

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    correct = []
    for doc in docs:
        context = f"Question: {doc['question']} Answer:"
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer(f"{context} {choice}", add_special_tokens=False).input_ids
            assert ids[: len(context_ids)] == context_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            scores.append(sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids))))
        correct.append(float(max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["label"]))
    return correct


def glue_accuracy(adapter_dir: str | Path, dev_tsv: str | Path, labels: list[str], cutoff: int = 512) -> float:
    """Dev accuracy of a classification adapter computed without polar.evaluate: the base named in its
    adapter_config.json plus the adapter loaded with PEFT, each TSV row (``sentence`` or ``sentence1`` /
    ``sentence2``, ``label``) tokenised and classified one at a time. ``labels``: label strings by class index."""
    import csv

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import polar  # noqa: F401  (registers PoLAR)

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    base = AutoModelForSequenceClassification.from_pretrained(
        config["base_model_name_or_path"], num_labels=len(labels), ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with open(dev_tsv, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    correct = 0
    for row in rows:
        texts = (row["sentence"],) if "sentence" in row else (row["sentence1"], row["sentence2"])
        enc = tokenizer(*texts, truncation=True, max_length=cutoff, return_tensors="pt")
        with torch.no_grad():
            pred = int(model(**enc).logits.argmax(-1))
        correct += int(labels[pred] == row["label"])
    return correct / len(rows)


def dense_median_stable_rank(adapter_dir: str | Path) -> float:
    """Median over modules of ‖ΔW‖_F² / ‖ΔW‖_2², computed without polar.analyze: the base plus the adapter loaded with
    PEFT, each adapted layer's ΔW formed densely from its own ``get_delta_weight`` and its singular values taken in
    float64 (the analysis works from the r × r core instead)."""
    import statistics

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import polar  # noqa: F401  (registers PoLAR)

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=2,
                                                              ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    ranks = []
    for module in model.modules():
        if hasattr(module, "get_delta_weight") and (hasattr(module, "polar_X") or hasattr(module, "lora_A")):
            with torch.no_grad():
                s = torch.linalg.svdvals(module.get_delta_weight("default").double())
            ranks.append(float((s.square().sum() / s[0].square()) if s[0] > 0 else 0.0))
    return statistics.median(ranks)
