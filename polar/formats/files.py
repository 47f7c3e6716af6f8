"""Reading adapter files: ``adapter_config.json``, adapter weights, state-dict files and base-model weights.

Nothing here interprets tensors; :mod:`polar.formats.parse` does. Every loader maps tensors onto the CPU and loads
``.bin`` / ``.pt`` files with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from .errors import AdapterFormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
EXPECTED = (
    "expected one of: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors/.bin) of a PoLAR, "
    "LoRA or DoRA adapter; a reference-code PoLAR folder (lora_A / lora_B / lora_S tensors); or a state-dict file "
    "(.safetensors, .bin, .pt, .pth) holding '<module>.lora_A[.weight]' / '<module>.lora_B[.weight]' pairs "
    "(or PoLAR '<module>.polar_X' / '.polar_Y' / '.polar_theta')"
)


def list_dir(path: Path, limit: int = 12) -> str:
    """A short listing of a folder for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()) if path.is_dir() else []
    if not names:
        return "nothing (empty folder)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_adapter_config(adapter_dir: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder, with a clear error when it is missing."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"Adapter folder {adapter_dir} does not exist.")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no {ADAPTER_CONFIG} (found: {list_dir(adapter_dir)}); "
            "pass the folder written by save_pretrained (or a `polar train` output folder)."
        )
    from .validate import check_config

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(
            f"{path} is not valid JSON ({err}); the file is damaged: re-save the adapter (save_pretrained) or restore "
            "the file"
        ) from None
    return check_config(config, str(path))


def adapter_weights_file(adapter_dir: Union[str, os.PathLike]) -> Path:
    """``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` of an adapter folder."""
    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FileNotFoundError(
        f"{adapter_dir} holds no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}); found: {list_dir(adapter_dir)}."
    )


def read_adapter_weights(adapter_dir: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter folder's weights file."""
    return load_state_dict_file(adapter_weights_file(adapter_dir))


def unwrap_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object (a state dict, possibly nested under ``state_dict`` / ``model``)."""
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        for name in ("state_dict", "model", "module", "model_state_dict", "params"):
            if isinstance(obj.get(name), Mapping):
                return unwrap_state_dict(obj[name], where)
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    raise AdapterFormatError(f"{where}: holds a {type(obj).__name__}, not a state dict of tensors; " + EXPECTED)


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open`` of a ``.safetensors`` file, with its errors (empty, truncated or damaged file) turned into an
    :class:`AdapterFormatError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except SafetensorError as err:
        size = path.stat().st_size if path.exists() else 0
        raise AdapterFormatError(
            f"{path}: not a readable safetensors file ({size} bytes: {err}); it is empty, truncated (an interrupted "
            "save or copy) or damaged. Copy or save it again"
        ) from None


def load_state_dict_file(
    path: Union[str, os.PathLike], keep: Optional[Callable[[str], bool]] = None
) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file on the CPU (only keys ``keep`` accepts).

    Only the kept tensors are read from safetensors files; ``torch.load`` files are memory-mapped when they can be.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        with open_safetensors(path) as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if keep is None or keep(k)}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an old (non-zip) file cannot be memory-mapped; the second try names the error
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise AdapterFormatError(f"{path}: could not be read as a PyTorch state dict ({err}); " + EXPECTED) from err
    sd = unwrap_state_dict(obj, str(path))
    return sd if keep is None else {k: v for k, v in sd.items() if keep(k)}


def file_keys(path: Path) -> list[str]:
    """All tensor names in a state-dict file (for error messages); [] when it cannot be read."""
    if path.suffix == ".safetensors":
        with open_safetensors(path) as handle:
            return list(handle.keys())
    try:
        return list(load_state_dict_file(path))
    except AdapterFormatError:
        return []


def describe_keys(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "no tensors"
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} tensors ({shown}{more})"


class BaseWeights:
    """Looks up base-model weights by module path, for DoRA's exact ΔW.

    ``source``: a model folder (``model.safetensors``, sharded ``model.safetensors.index.json``,
    ``pytorch_model.bin``), a single weights file, an ``nn.Module`` or a state dict. Only the requested tensors
    are read from safetensors files.
    """

    def __init__(self, source: Union[str, os.PathLike, nn.Module, Mapping[str, torch.Tensor]]):
        self._tensors: Optional[Mapping[str, torch.Tensor]] = None
        self._files: dict[str, Path] = {}  # key -> safetensors file
        self.description = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        if isinstance(source, nn.Module):
            self._tensors = {k.replace(".base_layer.", "."): v for k, v in source.state_dict().items()}
        elif isinstance(source, Mapping):
            self._tensors = {k.replace(".base_layer.", "."): v for k, v in source.items()}
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"base model {path} does not exist (pass a local model folder or weights file)")
            self._index_path(path)

    def _index_path(self, path: Path) -> None:
        if path.is_file():
            files = [path]
        else:
            index = path / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {k: path / v for k, v in weight_map.items()}
                return
            files = sorted(path.glob("*.safetensors"))
            if not files:
                files = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if not files:
            raise AdapterFormatError(
                f"base model {path}: no weights found (expected model.safetensors, model.safetensors.index.json "
                "or pytorch_model.bin)"
            )
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            if f.suffix == ".safetensors":
                with open_safetensors(f) as handle:
                    for k in handle.keys():
                        self._files[k] = f
            else:
                tensors.update(load_state_dict_file(f))
        if tensors:
            self._tensors = {k.replace(".base_layer.", "."): v for k, v in tensors.items()}

    def keys(self) -> list[str]:
        keys = list(self._files)
        if self._tensors is not None:
            keys += list(self._tensors)
        return keys

    def get(self, module: str) -> Optional[torch.Tensor]:
        """The ``<module>.weight`` tensor, matching on the longest common path suffix (base checkpoints may lack or
        add a prefix such as ``model.``)."""
        want = f"{module}.weight"
        keys = self.keys()
        if want not in self._files and (self._tensors is None or want not in self._tensors):
            parts = want.split(".")
            candidates: list[str] = []
            for i in range(len(parts) - 1):
                tail = ".".join(parts[i:])
                candidates = [k for k in keys if k == tail or k.endswith("." + tail)]
                if len(candidates) == 1:
                    break
                if len(candidates) > 1:
                    return None  # the longest tail with several hits: ambiguous
            if len(candidates) != 1:
                return None
            want = candidates[0]
        if self._tensors is not None and want in self._tensors:
            return self._tensors[want]
        with open_safetensors(self._files[want]) as handle:
            return handle.get_tensor(want)
