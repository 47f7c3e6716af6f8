"""Instruction data: local JSON / JSONL files and MetaMathQA-style math, turned into (prompt, response) pairs.

Accepted record layouts (the first that fits wins):

- Alpaca: ``instruction`` (+ optional ``input``) and ``output`` → the prompt template is applied;
- MetaMathQA: ``query`` and ``response`` → treated as Alpaca ``instruction`` / ``output``;
- ``prompt`` and ``completion`` → used verbatim;
- ``text`` → one text, trained on in full (no prompt/response split).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

#: Named prompt templates for Alpaca-style records: name -> (template with input, template without input).
TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (ALPACA_WITH_INPUT, ALPACA_NO_INPUT),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
    "none": ("{instruction}{input}", "{instruction}"),
}

LAYOUTS = "instruction/input/output (Alpaca), query/response (MetaMathQA), prompt/completion, or text"


@dataclass(frozen=True)
class Example:
    """One causal-LM training example: the loss covers ``response`` (and ``prompt`` unless response-only)."""

    prompt: str
    response: str

    @property
    def text(self) -> str:
        return self.prompt + self.response


def resolve_template(template: str | None) -> tuple[str, str]:
    """A template name from :data:`TEMPLATES`, or a format string using ``{instruction}`` (and ``{input}``)."""
    if template is None:
        return TEMPLATES["alpaca"]
    if template in TEMPLATES:
        return TEMPLATES[template]
    path = Path(template)
    if "{" not in template and path.suffix in (".txt", ".tmpl") and path.is_file():
        template = path.read_text()
    if "{instruction}" not in template:
        raise ValueError(
            f"unknown prompt template {template!r}: pass one of {', '.join(TEMPLATES)}, or a format string "
            "containing {instruction} (and optionally {input})."
        )
    without_input = template.replace("{input}", "")
    return template, without_input


def format_prompt(instruction: str, input_text: str = "", template: str | None = None) -> str:
    with_input, without_input = resolve_template(template)
    if input_text:
        return with_input.format(instruction=instruction, input=input_text)
    return without_input.format(instruction=instruction, input="")


def record_to_example(record: dict, template: str | None = None, where: str = "record") -> Example:
    """Map one record to an :class:`Example`; ``where`` (e.g. ``"data.jsonl line 3"``) names it in errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")

    def need(field: str) -> str:
        value = record.get(field)
        if value is None:
            raise ValueError(f"{where}: missing field {field!r} (record layouts: {LAYOUTS}).")
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}.")
        return value

    if "instruction" in record:
        input_text = record.get("input") or ""
        return Example(format_prompt(need("instruction"), str(input_text), template), need("output"))
    if "query" in record:
        return Example(format_prompt(need("query"), "", template), need("response"))
    if "prompt" in record:
        return Example(need("prompt"), need("completion"))
    if "text" in record:
        return Example("", need("text"))
    present = ", ".join(sorted(map(str, record))) or "none"
    raise ValueError(
        f"{where}: missing field 'instruction' (or 'query', 'prompt', 'text'); fields present: {present}. "
        f"Record layouts: {LAYOUTS}."
    )


def read_records(path: str | Path) -> Iterable[tuple[str, dict]]:
    """Yield ``(where, record)`` from a JSON array / object-with-list file or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    data = None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": several JSON values, i.e. JSON lines
                raise ValueError(f"{path} line {err.lineno}: not valid JSON ({err.msg}).") from None
    if data is None:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({err.msg}).") from None
            yield f"{path} line {lineno}", record
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a JSON list of records (or one object holding a single list).")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records.")
    # Report the line where each record starts, so errors point into the file.
    starts = _record_start_lines(text, len(data))
    for i, record in enumerate(data):
        line = starts[i] if i < len(starts) else None
        yield (f"{path} line {line} (record {i + 1})" if line else f"{path} record {i + 1}"), record


def _record_start_lines(text: str, count: int) -> list[int]:
    """Best-effort line numbers of the top-level records of a JSON list (``[{...}, {...}]``)."""
    lines, depth, in_str, escape, line = [], 0, False, False, 1
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if ch == "{" and depth == 2:
                lines.append(line)
        elif ch in "]}":
            depth -= 1
        if len(lines) >= count:
            break
    return lines


def load_instruction_file(path: str | Path, template: str | None = None, limit: int | None = None) -> list[Example]:
    """Read a local JSON / JSONL instruction file into :class:`Example` s (errors name file, line, field)."""
    examples = []
    for where, record in read_records(path):
        examples.append(record_to_example(record, template, where))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"data file {str(path)!r} holds no records.")
    return examples


def load_math(
    data_file: str | Path | None = None, template: str | None = None, limit: int | None = None
) -> list[Example]:
    """MetaMathQA (``query``/``response``) from a local file, or from the hub (``meta-math/MetaMathQA``)."""
    if data_file is not None:
        return load_instruction_file(data_file, template, limit)
    from polar.data.hub import load_hub_dataset

    dataset = load_hub_dataset("meta-math/MetaMathQA", split="train")
    examples = []
    for i, record in enumerate(dataset):
        examples.append(record_to_example(dict(record), template, f"meta-math/MetaMathQA row {i}"))
        if limit is not None and len(examples) >= limit:
            break
    return examples
