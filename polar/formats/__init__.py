"""The one place adapter files are read: PoLAR, LoRA, DoRA, reference-code PoLAR (``lora_S`` with its
``parameterize_S``), early-PEFT fused-qkv LoRA (``enable_lora``) and raw ``lora_A`` / ``lora_B`` state dicts.

Conversion (:mod:`polar.conversion`), analysis (:mod:`polar.analysis`) and evaluation (:mod:`polar.evaluation`)
all read through it. See ``docs/analysis.md`` ("What is recognised").
"""

from .deltas import PARAMETERIZE_S, AdapterSource, ModuleDelta
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHT_FILES,
    STATE_DICT_SUFFIXES,
    AdapterFormatError,
    BaseWeights,
    adapter_weights_file,
    load_state_dict_file,
    read_adapter_config,
    read_adapter_weights,
)
from .keys import PEFT_PREFIX, AdapterKey, compile_regex, parse_key, peft_type
from .parse import reference_parameterization, read_state_dict
from .read import adapter_kind, iter_sources, read_model, read_path, read_source

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHT_FILES",
    "PARAMETERIZE_S",
    "PEFT_PREFIX",
    "STATE_DICT_SUFFIXES",
    "AdapterFormatError",
    "AdapterKey",
    "AdapterSource",
    "BaseWeights",
    "ModuleDelta",
    "adapter_kind",
    "adapter_weights_file",
    "compile_regex",
    "iter_sources",
    "load_state_dict_file",
    "parse_key",
    "peft_type",
    "read_adapter_config",
    "read_adapter_weights",
    "read_model",
    "read_path",
    "read_source",
    "read_state_dict",
    "reference_parameterization",
]
