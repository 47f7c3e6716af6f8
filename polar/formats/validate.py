"""Checks that turn malformed adapter files into one clear :class:`AdapterFormatError` before anything uses them:
wrong JSON types in ``adapter_config.json``, factors that are not floating point, not finite, of the wrong number of
dimensions or of mismatched ranks.

Every message names the file (or folder), the field or module and tensor, what was found and what to do.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional

import torch

from .errors import AdapterFormatError

RESAVE = "re-save the adapter with save_pretrained or restore the file from a copy"


def _found(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} (a JSON {_json_type(value)})"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def check_config(config: Any, path: str) -> dict[str, Any]:
    """``config`` (parsed ``adapter_config.json`` at ``path``) if the fields that scale or shape the update have
    usable types; a PoLAR config must give ``r`` and ``alpha``. Configs of PoLAR, LoRA (and DoRA, reference-code
    PoLAR: LoRA-style) and of no stated type are checked."""
    if not isinstance(config, dict):
        raise AdapterFormatError(
            f"{path}: holds {_found(config)}, not a JSON object of adapter settings; {RESAVE}"
        )

    def bad(field: str, value: Any, want: str) -> AdapterFormatError:
        return AdapterFormatError(f"{path}: field {field!r} is {_found(value)}; it must be {want}. Correct it, or "
                                  f"{RESAVE}")

    peft_type = config.get("peft_type")
    if peft_type is not None and not isinstance(peft_type, str):
        raise bad("peft_type", peft_type, "a string such as \"POLAR\" or \"LORA\"")
    if peft_type is not None and peft_type.upper() not in ("POLAR", "LORA"):
        return config  # another PEFT method: its fields mean other things (OFT's r may be 0); readers refuse it by name
    required = ("r", "alpha") if str(peft_type).upper() == "POLAR" else ()
    for field in required:
        if field not in config:
            raise AdapterFormatError(f"{path}: a PoLAR adapter_config.json must give {field!r} (ΔW is scaled by "
                                     f"alpha / r); it is missing. {RESAVE[0].upper() + RESAVE[1:]}")
    if "r" in config and not _positive_int(config["r"]):
        raise bad("r", config["r"], "a positive integer (the adapter's rank)")
    for field in ("alpha", "lora_alpha"):
        value = config.get(field)
        if (field in required or value is not None) and not _positive_number(value):
            raise bad(field, value, "a positive finite number (ΔW is scaled by alpha / r)")
    for field, check, want in (("rank_pattern", _positive_int, "a positive integer"),
                               ("alpha_pattern", _positive_number, "a positive finite number")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise bad(field, patterns, "an object {module regex: value}")
        for key, value in patterns.items():
            if not check(value):
                raise bad(f"{field}[{key!r}]", value, want)
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise bad(field, config[field], "true or false")
    for field in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
        value = config.get(field)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list)
                                                                  and all(isinstance(v, str) for v in value))):
            raise bad(field, value, "null, a string or an array of strings")
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or (
            isinstance(layers, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in layers))):
        raise bad("layers_to_transform", layers, "null, an integer or an array of integers")
    for field in ("base_model_name_or_path", "revision", "task_type"):
        if config.get(field) is not None and not isinstance(config[field], str):
            raise bad(field, config[field], "null or a string")
    enable = config.get("enable_lora")
    if enable is not None and not (isinstance(enable, list) and all(isinstance(v, bool) for v in enable)):
        raise bad("enable_lora", enable, "null or an array of true/false")
    return config


def check_tensor(tensor: Any, where: str, module: str, name: str, ndims: tuple[int, ...]) -> torch.Tensor:
    """A factor must be a floating-point tensor with one of ``ndims`` dimensions, no zero-sized dimension, and
    finite entries."""
    what = f"{where}: module {module!r}: {name}"
    if not isinstance(tensor, torch.Tensor):
        raise AdapterFormatError(f"{what} is a {type(tensor).__name__}, not a tensor; {RESAVE}")
    if tensor.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise AdapterFormatError(f"{what} has shape {tuple(tensor.shape)} ({tensor.ndim}-D); it must be {want}. "
                                 f"The file is damaged or holds another kind of adapter: {RESAVE}")
    if not torch.is_floating_point(tensor):
        raise AdapterFormatError(f"{what} has dtype {tensor.dtype}; adapter factors must be floating point "
                                 f"(float32, bfloat16, float16, float64). {RESAVE[0].upper() + RESAVE[1:]}")
    if tensor.numel() == 0:
        raise AdapterFormatError(f"{what} has shape {tuple(tensor.shape)}: it is empty (rank 0?); {RESAVE}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor[~finite]
        kinds = ", ".join(sorted({"NaN" if v != v else ("+Inf" if v > 0 else "-Inf") for v in bad[:64].tolist()}))
        raise AdapterFormatError(
            f"{what} holds {int(bad.numel())} non-finite value(s) ({kinds}) of {tensor.numel()}; the training that "
            "wrote it diverged or the file is damaged. Use an earlier checkpoint or retrain"
        )
    return tensor


def check_polar_factors(
    module: str, x: Any, y: Any, theta: Any, where: str, expected_r: Optional[int] = None
) -> int:
    """The rank r of a PoLAR module after checking X (out × r), Y (in × r) and Θ (r × r, or r for a diagonal Θ);
    ``expected_r``: the rank the adapter's config gives the module."""
    check_tensor(x, where, module, "polar_X", (2,))
    check_tensor(y, where, module, "polar_Y", (2,))
    check_tensor(theta, where, module, "polar_theta", (1, 2))
    r = x.shape[1]
    if y.shape[1] != r:
        raise AdapterFormatError(
            f"{where}: module {module!r}: polar_X {tuple(x.shape)} has rank {r} but polar_Y {tuple(y.shape)} has rank "
            f"{y.shape[1]} (X is out × r, Y is in × r); {RESAVE}"
        )
    if tuple(theta.shape) not in ((r, r), (r,)):
        raise AdapterFormatError(
            f"{where}: module {module!r}: polar_theta {tuple(theta.shape)} should be r × r = {r} × {r} (or {r} for a "
            f"diagonal Θ) to match polar_X {tuple(x.shape)}; {RESAVE}"
        )
    if expected_r is not None and expected_r != r:
        raise AdapterFormatError(
            f"{where}: module {module!r}: the tensors have rank {r} but adapter_config.json gives r = {expected_r} "
            f"(r / rank_pattern); the config and weights do not belong together: {RESAVE}"
        )
    return r


def check_finite_state(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Every floating-point tensor of a state dict (heads, biases passed on with an adapter) is finite."""
    for key, tensor in state.items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(
                f"{where}: tensor {key!r} holds non-finite values (NaN or Inf); the training that wrote it diverged "
                "or the file is damaged. Use an earlier checkpoint or retrain"
            )
