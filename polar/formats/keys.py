"""Tensor names of low-rank adapters.

A key names a module path, a factor (``polar_X``, ``lora_A``, ...) and possibly an adapter name, in any of the
layouts seen in the wild: PEFT's saved files (``<module>.lora_A.weight``), a live model's ``state_dict()``
(``<module>.lora_A.<adapter>.weight``), the original loralib checkpoints (``<module>.lora_A``) and torch
parametrisations (``<module>.lora_S.<adapter>.parametrizations.weight.original``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .errors import AdapterFormatError

PEFT_PREFIX = "base_model.model."
# Path components naming a low-rank factor, and what they are.
PARTS = {
    "polar_X": "X",
    "polar_Y": "Y",
    "polar_theta": "theta",
    "lora_A": "A",
    "lora_B": "B",
    "lora_S": "S",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "magnitude",
}
SUFFIX_WORDS = {"weight", "parametrizations", "original", "original0", "original1"}


@dataclass
class AdapterKey:
    module: str  # without PEFT's "base_model.model." prefix
    part: str  # X, Y, theta, A, B, S, magnitude
    adapter: Optional[str]
    embedding: bool


def parse_key(key: str) -> Optional[AdapterKey]:
    """The adapter factor a tensor name holds, or ``None`` for any other tensor (base weights, heads, biases)."""
    parts = key.split(".")
    index = next((i for i in range(len(parts) - 1, 0, -1) if parts[i] in PARTS), None)
    if index is None:
        return None
    rest = parts[index + 1 :]
    if rest and rest[-1] == "bias":
        return None
    adapter = rest[0] if rest and rest[0] not in SUFFIX_WORDS else None
    module = ".".join(parts[:index]).removeprefix(PEFT_PREFIX)
    return AdapterKey(module=module, part=PARTS[parts[index]], adapter=adapter, embedding="embedding" in parts[index])


def is_adapter_key(key: str) -> bool:
    return parse_key(key) is not None


def keep_for_analysis(key: str) -> bool:
    """Adapter tensors, plus base weights saved next to them (``model.state_dict()`` of a PeftModel; DoRA needs
    them)."""
    return is_adapter_key(key) or key.endswith(".base_layer.weight")


def group_tensors(
    sd: Mapping[str, torch.Tensor], where: str, adapter_name: Optional[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, bool], Optional[str]]:
    """Adapter tensors grouped by module (``{module: {part: tensor}}``), which modules are embeddings, and the
    adapter name chosen among those embedded in the keys (``lora_A.<name>.weight``)."""
    parsed = [(k, p) for k in sd if (p := parse_key(k)) is not None]
    names = sorted({p.adapter for _, p in parsed if p.adapter is not None})
    chosen: Optional[str] = None
    if names:
        if adapter_name is not None:
            if adapter_name not in names:
                raise AdapterFormatError(
                    f"{where}: no adapter named {adapter_name!r}; it holds adapter(s) {', '.join(map(repr, names))}"
                )
            chosen = adapter_name
        elif len(names) == 1:
            chosen = names[0]
        else:
            raise AdapterFormatError(
                f"{where}: holds several adapters ({', '.join(map(repr, names))}); choose one with "
                "adapter_name=... (CLI: --adapter-name NAME)"
            )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    for key, p in parsed:
        if p.adapter is not None and p.adapter != chosen:
            continue
        if p.part in groups.get(p.module, {}):
            raise AdapterFormatError(f"{where}: module {p.module!r} holds its {p.part} factor twice (keys clash)")
        groups.setdefault(p.module, {})[p.part] = sd[key]
        embedding[p.module] = embedding.get(p.module, False) or p.embedding
    return groups, embedding, chosen


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def compile_regex(pattern: str, what: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid {what} regular expression {pattern!r}: {err}") from None
