"""Registers PoLAR with PEFT without editing PEFT's files.

``peft.utils.register_peft_method`` only accepts members of PEFT's own ``PeftType`` enum, so PoLAR adds its
``PolarPeftType.POLAR`` key to PEFT's lookup tables directly. The key hashes and compares equal to the string
``"POLAR"`` that ``adapter_config.json`` holds, so configs round-trip through stock PEFT and transformers.
"""

from __future__ import annotations

from peft import mapping

from .config import PolarConfig, PolarPeftType
from .model import PolarModel


def register() -> None:
    """Make ``"POLAR"`` a known PEFT type (idempotent)."""
    key = PolarPeftType.POLAR
    for table, value in (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, PolarConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, PolarModel),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, PolarModel.prefix),
    ):
        existing = table.get(key)
        if existing is not None and existing is not value:
            raise RuntimeError(
                f"Another package already registered PEFT type 'POLAR' as {existing!r}; cannot register polar-peft."
            )
        table[key] = value
