"""Loading base models and tokenizers, the errors that say what to do offline, and version recording.

The one place training (:mod:`polar.training`) and evaluation (:mod:`polar.evaluation`) load a model from a name:
:func:`load_model_and_tokenizer` (or :func:`load_model` / :func:`load_tokenizer` alone). A name that is not a local
folder goes to the Hugging Face hub; when that fails, :func:`offline_model_error` says how to get a local copy.
:func:`model_source` is the single point where a model *name* becomes what ``from_pretrained`` reads, so resolvers
(short names of packaged models, converted files) hook in there.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

KINDS = ("causal", "seq-cls")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
VERSIONED = ("polar-peft", "torch", "transformers", "peft", "accelerate", "datasets", "lm-eval", "tokenizers")


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (from transformers, datasets, huggingface_hub or lm-eval) means the hub was unreachable."""
    text = f"{type(err).__name__}: {err}".lower()
    markers = (
        "connection", "offline", "resolve", "timed out", "timeout", "max retries", "couldn't reach",
        "could not reach", "network", "name or service not known", "temporary failure", "localentrynotfound",
        "we couldn't connect", "not found on the hub", "doesn't exist on the hub", "cannot find the requested files",
    )
    return any(m in text for m in markers)


def offline_model_error(model: str, err: BaseException) -> FileNotFoundError:
    """The error to raise when ``model`` is not a local folder and the hub could not provide it."""
    first_line = str(err).splitlines()[0] if str(err) else ""
    return FileNotFoundError(
        f"cannot load model {model!r}: it is not a local folder and could not be fetched from the Hugging Face hub "
        f"({type(err).__name__}: {first_line}). If this machine is offline, download it elsewhere (e.g. "
        f"`huggingface-cli download {model} --local-dir DIR`) and pass the local folder: --model DIR."
    )


def model_source(model: str) -> str:
    """What ``from_pretrained`` should read for the model name ``model``: a short name such as ``smollm2-135m`` or a
    ``.gguf`` path becomes its converted local folder (:func:`polar.models.resolve_model`); anything else itself."""
    from polar.models import resolve_model

    return resolve_model(model)


def torch_dtype(name: str | None) -> Any:
    """``torch.float32`` / ``bfloat16`` / ``float16`` for a dtype name; ``None`` for ``None`` or ``"auto"``."""
    import torch

    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: float32, bfloat16, float16, auto.")
    return getattr(torch, DTYPES[name])


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` with the offline advice when the hub cannot be reached."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_source(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if not Path(model).is_dir():
            raise offline_model_error(model, err) from err
        raise


def load_model(model: str, kind: str, dtype: Any = None, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM`` (kind "causal") or ``AutoModelForSequenceClassification`` (kind "seq-cls"; a fresh
    head when the label count differs from the checkpoint's)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {', '.join(KINDS)}.")
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = dict(kwargs)
    if kind != "causal":
        extra.setdefault("ignore_mismatched_sizes", True)
    if dtype is not None:
        extra["dtype"] = dtype
    source = model_source(model)
    try:
        loaded = cls.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except TypeError:
        if "dtype" not in extra:
            raise
        extra["torch_dtype"] = extra.pop("dtype")  # transformers < 4.56 spells it torch_dtype
        loaded = cls.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        if not Path(model).is_dir():
            raise offline_model_error(model, err) from err
        raise
    if source != model:
        loaded.name_or_path = model  # adapters record the short name, which resolves on any machine
    return loaded


def load_model_and_tokenizer(model: str, kind: str, dtype: Any = None, trust_remote_code: bool = False,
                             tokenizer_source: str | None = None, **model_kwargs: Any) -> tuple[Any, Any]:
    """The model and its tokenizer, ready for training or evaluation.

    The tokenizer (from ``tokenizer_source``, default ``model``) gets its eos token as pad token when it has none;
    a classification model without ``pad_token_id`` gets the tokenizer's (batched sequence classification needs it).
    """
    tokenizer = load_tokenizer(tokenizer_source or model, trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {tokenizer_source or model!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    loaded = load_model(model, kind, dtype, trust_remote_code, **model_kwargs)
    if kind == "seq-cls" and loaded.config.pad_token_id is None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return loaded, tokenizer


def package_versions() -> dict[str, str | None]:
    """Python and the versions of the packages a result depends on (``None`` when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


__all__ = ["is_connection_error", "load_model", "load_model_and_tokenizer", "load_tokenizer", "model_source",
           "offline_model_error", "package_versions", "torch_dtype"]
