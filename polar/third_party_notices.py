"""Keep polar's commands free of third-party notices that are not about anything the user did.

PEFT imports bitsandbytes when it is installed (``peft/helpers.py``, checked against PEFT 0.21.2), and
bitsandbytes ≥ 0.49 then tries to fetch an optional CPU 4-bit kernel from the kernels hub at import time. Where
that kernel is not trusted or not reachable it logs "Failed to load CPU gemm_4bit_forward from kernels-community"
and keeps its own CPU path, which is what runs either way. With no logging configured, Python prints that record
on stderr, so every ``polar`` command would open with an error line.

The filter below drops that one record, and only while polar imports PEFT: bitsandbytes' other messages, and this
one for a program that imports bitsandbytes itself first, are untouched.

PEFT's ``PeftModel`` asks the base model for ``is_gradient_checkpointing`` (PEFT 0.21.2), which transformers ≥ 5
answers with a FutureWarning naming its new spelling: a note to PEFT's authors, printed on every ``polar train`` and
``polar eval``. :func:`peft_checkpointing_alias_silenced` drops that one warning while polar builds a PeftModel.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

KERNEL_NOTICE_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNEL_NOTICE)


@contextmanager
def bitsandbytes_kernel_notice_silenced() -> Iterator[None]:
    """While active, bitsandbytes' optional-CPU-kernel notice is not emitted (nothing else is filtered)."""
    logger = logging.getLogger(KERNEL_NOTICE_LOGGER)
    notice_filter = _DropKernelNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


CHECKPOINTING_ALIAS_WARNING = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def peft_checkpointing_alias_silenced() -> Iterator[None]:
    """While active, transformers' FutureWarning about PEFT's ``is_gradient_checkpointing`` read is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CHECKPOINTING_ALIAS_WARNING, category=FutureWarning)
        yield
