"""The one place adapter files are read: PoLAR, LoRA, DoRA, reference-code PoLAR (``lora_S`` with its
``parameterize_S``), early-PEFT fused-qkv LoRA (``enable_lora``) and raw ``lora_A`` / ``lora_B`` state dicts.

Each module's scale (``rank_pattern`` / ``alpha_pattern`` resolved as PEFT does) comes from
:func:`polar.scaling.module_scaling`, as the tuner's does.

Conversion and export (:mod:`polar.conversion`, :mod:`polar.gguf_export`), analysis (:mod:`polar.analysis`) and
evaluation (:mod:`polar.evaluation`) all read through it. See ``docs/analysis.md`` ("What is recognised").
"""

from polar.scaling import peft_type

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
from .keys import PEFT_PREFIX, AdapterKey, compile_regex, parse_key
from .parse import reference_parameterization, read_state_dict
from .read import adapter_kind, iter_sources, read_model, read_path, read_source
from .validate import check_finite_state

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
    "check_finite_state",
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
