"""From tensors to :class:`~polar.formats.deltas.ModuleDelta`: PoLAR, LoRA, DoRA, reference-code PoLAR and the
early-PEFT fused-qkv LoRA layout."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .deltas import PARAMETERIZE_S, REFERENCE_THETA, AdapterSource, ModuleDelta
from .files import EXPECTED, AdapterFormatError, BaseWeights, describe_keys
from polar.scaling import configured_rank, module_scaling

from .keys import PEFT_PREFIX, compile_regex, group_tensors, natural_key, parse_key
from .validate import RESAVE, check_polar_factors, check_tensor


def detect_type(groups: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> str:
    """"polar", "polar-reference" (lora_S present), "dora" (magnitude vectors) or "lora"."""
    kinds = set()
    for parts in groups.values():
        if "X" in parts or "Y" in parts or "theta" in parts:
            kinds.add("polar")
        elif "S" in parts:
            kinds.add("polar-reference")
        elif "magnitude" in parts:
            kinds.add("dora")
        elif "A" in parts or "B" in parts:
            kinds.add("lora")
    if len(kinds) > 1:
        raise AdapterFormatError(f"{where}: mixes adapter types {sorted(kinds)}; read them separately")
    return kinds.pop() if kinds else ""


def reference_parameterization(config: Mapping[str, Any], requested: Optional[str], where: str) -> tuple[str, str]:
    """The ``parameterize_S`` of a reference-code checkpoint and where it came from ("config", "given", "default").

    The checkpoint's own ``adapter_config.json`` value wins; a different ``requested`` value is refused rather than
    silently preferred or ignored.
    """
    for value, what in ((config.get("parameterize_S"), f"{where}: adapter_config.json parameterize_S"),
                        (requested, "reference_theta (--reference-theta)")):
        if value is not None and value not in PARAMETERIZE_S:
            raise AdapterFormatError(f"{what} is {value!r}; the reference code knows {', '.join(PARAMETERIZE_S)}")
    stored = config.get("parameterize_S")
    if stored is not None:
        if requested is not None and requested != stored:
            raise AdapterFormatError(
                f"{where}: its adapter_config.json says parameterize_S={stored!r}, but {requested!r} was requested; "
                "drop --reference-theta (reference_theta=...) to use the recorded value"
            )
        return stored, "config"
    if requested is not None:
        return requested, "given"
    return "identity", "default"


def linear_orientation(mat: torch.Tensor) -> torch.Tensor:
    """A factor as a matrix (conv kernels flattened: out × in·k)."""
    return mat.reshape(mat.shape[0], -1) if mat.ndim > 2 else mat


def fused_groups(a: torch.Tensor, b: torch.Tensor, config: Mapping[str, Any], module: str,
                 where: str) -> Optional[list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Early PEFT's ``MergedLinear`` (fused qkv, ``enable_lora``): ``[(group index, A_j, B_j), ...]`` or ``None``.

    lora_A (g·r × in) stacks the g enabled groups' A; lora_B is a grouped Conv1d weight (g·o × r × 1):
    ΔW_j = B_j A_j with B_j = lora_B[j·o:(j+1)·o, :, 0], A_j = lora_A[j·r:(j+1)·r].
    """
    enable = config.get("enable_lora")
    fused_shape = b.ndim == 3 and b.shape[2] == 1 and a.ndim == 2 and a.shape[0] != b.shape[1]
    if not fused_shape and not (isinstance(enable, list) and len(enable) > 1):
        return None
    r = b.shape[1]
    g = a.shape[0] // r if r else 0
    if b.ndim != 3 or g * r != a.shape[0] or g == 0 or b.shape[0] % g:
        raise AdapterFormatError(
            f"{where}: module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} fit neither LoRA "
            "(A r × in, B out × r) nor early PEFT's fused layout (A g·r × in, B g·o × r × 1 for g enabled groups)"
        )
    positions = list(range(g))
    if isinstance(enable, list):
        positions = [i for i, on in enumerate(enable) if on]
        if len(positions) != g:
            raise AdapterFormatError(
                f"{where}: module {module!r}: enable_lora {enable} enables {len(positions)} groups but lora_A "
                f"{tuple(a.shape)} holds {g} blocks of r = {r}"
            )
    o = b.shape[0] // g
    return [(pos, a[j * r:(j + 1) * r], b[j * o:(j + 1) * o, :, 0]) for j, pos in enumerate(positions)]


def modules_from_groups(
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    kind: str,
    config: Mapping[str, Any],
    where: str,
    *,
    scale_known: bool,
    alpha: Optional[float] = None,
    parameterize_s: str = "identity",
    base: Optional[BaseWeights] = None,
    base_from_sd: Optional[Mapping[str, torch.Tensor]] = None,
    tensors_where: Optional[str] = None,
) -> tuple[list[ModuleDelta], list[str]]:
    """One ModuleDelta per adapted module (per enabled group for early-PEFT fused layers), plus notes.

    ``tensors_where`` names the weights file in messages about the tensors (default ``where``).
    """
    tw = tensors_where or where
    notes: list[str] = []
    out: list[ModuleDelta] = []
    missing_base: list[str] = []
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    # Without a config the scale is alpha / r for a given alpha, else 1 (the tensors' own product).
    fallback = {"lora_alpha": alpha} if alpha is not None else {}

    def scale_of(module: str, r: int) -> float:
        return module_scaling(config if scale_known else fallback, module, r=r).scale

    for module in sorted(groups, key=natural_key):
        parts = groups[module]
        if kind == "polar":
            missing = [p for p in ("X", "Y", "theta") if p not in parts]
            if missing:
                raise AdapterFormatError(
                    f"{tw}: module {module!r} lacks polar_{'/polar_'.join(missing)} (has {sorted(parts)}); {RESAVE}"
                )
            x, y, theta = parts["X"], parts["Y"], parts["theta"]
            r = check_polar_factors(module, x, y, theta, tw, configured_rank(config, module) if scale_known else None)
            out.append(ModuleDelta.polar(module, x, y, theta, scale_of(module, r)))
            continue
        if "A" not in parts or "B" not in parts:
            raise AdapterFormatError(
                f"{tw}: module {module!r} has {sorted(parts)} but needs both lora_A and lora_B; {RESAVE}"
            )
        # 2-D (linear, embedding), 3-D (early PEFT's fused lora_B), 4-D (conv kernels)
        for part, name in (("A", "lora_A"), ("B", "lora_B"), ("S", "lora_S"), ("magnitude", "lora_magnitude_vector")):
            if part in parts:
                check_tensor(parts[part], tw, module, name, (1, 2, 3, 4) if part == "magnitude" else
                             (1, 2) if part == "S" else (2, 3, 4))
        fused = fused_groups(parts["A"], parts["B"], config, module, tw) if kind == "lora" else None
        if fused is not None:
            for pos, a_j, b_j in fused:
                r = a_j.shape[0]
                md = ModuleDelta.lora(f"{module}[{pos}]", "lora", a_j, b_j, scale_of(module, r))
                md.group = pos
                out.append(md)
            continue
        # lora_embedding_A (r × num_embeddings) / lora_embedding_B (dim × r) chain like linear ones: ΔW = B A
        a_mat = linear_orientation(parts["A"])  # r × in (conv kernels flattened)
        b_mat = linear_orientation(parts["B"])  # out × r
        r = a_mat.shape[0]
        if b_mat.shape[1] != r:
            raise AdapterFormatError(
                f"{tw}: module {module!r}: lora_A {tuple(a_mat.shape)} (r × in) and lora_B {tuple(b_mat.shape)} "
                f"(out × r) do not chain: their ranks differ; {RESAVE}"
            )
        scale = scale_of(module, r)
        core, theta = None, None
        if kind == "polar-reference":
            stored = parts["S"]
            if tuple(stored.shape) not in ((r, r), (r,)):
                raise AdapterFormatError(
                    f"{tw}: module {module!r}: lora_S {tuple(stored.shape)} should be r × r = {r} × {r} to match lora_A "
                    f"{tuple(a_mat.shape)}; {RESAVE}"
                )
            theta = REFERENCE_THETA[parameterize_s]
            if parameterize_s == "removal":
                core = None  # S = I whatever was stored
            elif parameterize_s == "diagonal" or stored.ndim == 1:
                core, theta = (torch.diagonal(stored) if stored.ndim == 2 else stored), "diagonal"
            else:
                core = stored
        md = ModuleDelta.lora(module, kind, a_mat, b_mat, scale, core, theta)
        if kind == "dora":
            md.magnitude = parts["magnitude"]
            weight = None
            if base_from_sd is not None:
                weight = base_from_sd.get(f"{module}.base_layer.weight", base_from_sd.get(f"{module}.weight"))
            if weight is None and base is not None:
                weight = base.get(module)
            if weight is not None:
                if fan_in_fan_out and weight.ndim == 2:
                    weight = weight.T
                weight = linear_orientation(weight)
                if tuple(weight.shape) != (md.out_features, md.in_features):
                    raise AdapterFormatError(
                        f"{where}: base weight of {module!r} has shape {tuple(weight.shape)}, the adapter expects "
                        f"{(md.out_features, md.in_features)}; is --base-model the model the adapter was trained on?"
                    )
                md.base_weight = weight
            else:
                md.delta = "directional"
                missing_base.append(module)
        out.append(md)
    if missing_base:
        if base is None:
            notes.append(
                f"{where}: DoRA without a base model: analysed the directional part scale·BA of "
                f"{len(missing_base)} module(s), not the exact ΔW = m·(W+sBA)/‖W+sBA‖ − W. Pass the base model "
                "(--base-model / base_model=...) for the exact update."
            )
        else:
            notes.append(
                f"{where}: base model {base.description} has no weight for {len(missing_base)} DoRA module(s) "
                f"(e.g. {missing_base[0]!r}); analysed their directional part scale·BA only."
            )
    return out, notes


def filter_modules(modules: list[ModuleDelta], pattern: Optional[str]) -> list[ModuleDelta]:
    if not pattern:
        return modules
    rx = compile_regex(pattern, "modules")
    return [m for m in modules if rx.search(m.module)]


def read_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    where: str = "state dict",
    config: Optional[Mapping[str, Any]] = None,
    adapter_name: Optional[str] = None,
    alpha: Optional[float] = None,
    reference_theta: Optional[str] = None,
    base_model: Any = None,
    modules: Optional[str] = None,
    tensors_where: Optional[str] = None,
) -> AdapterSource:
    """Read adapter tensors from an in-memory state dict (PEFT-saved, ``model.state_dict()`` or raw loralib keys).

    Without ``config`` the LoRA scaling is unknown: it is ``alpha / r`` when ``alpha`` is given, else 1 (norms then
    describe BA; stable and effective ranks do not depend on the scaling). ``reference_theta`` is the reference
    code's ``parameterize_S`` ("identity" = S free, "diagonal", "removal" = S fixed to I) for checkpoints whose
    config does not record it (default "identity").
    """
    groups, _, chosen = group_tensors(sd, where, adapter_name)
    if not groups:
        raise AdapterFormatError(f"{where}: no adapter tensors among {describe_keys(list(sd))}; " + EXPECTED)
    kind = detect_type(groups, where)
    config = dict(config or {})
    if kind == "lora" and config.get("use_dora"):
        raise AdapterFormatError(f"{where}: adapter_config.json says use_dora but no lora_magnitude_vector tensors")
    notes: list[str] = []
    parameterize_s = "identity"
    if kind == "polar-reference":
        parameterize_s, origin = reference_parameterization(config, reference_theta, where)
        if origin == "default":
            notes.append(f"{where}: reference PoLAR without parameterize_S in its config: read as 'identity' (S free); "
                         "pass --reference-theta diagonal/removal if it was trained otherwise.")
        elif parameterize_s != "identity":
            notes.append(f"{where}: reference PoLAR with parameterize_S={parameterize_s!r} ({origin}).")
    elif reference_theta is not None:
        raise AdapterFormatError(f"{where}: reference_theta (--reference-theta) applies to reference-code PoLAR "
                                 f"checkpoints (lora_S tensors) only; this is a {kind} adapter")
    base = None
    if kind == "dora" and base_model is not None:
        base = base_model if isinstance(base_model, BaseWeights) else BaseWeights(base_model)
    base_from_sd = {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()
                    if k.endswith(".weight") and parse_key(k) is None}
    mods, more = modules_from_groups(
        groups, kind, config, where, scale_known=bool(config), alpha=alpha, parameterize_s=parameterize_s,
        base=base, base_from_sd=base_from_sd or None, tensors_where=tensors_where,
    )
    notes += more
    if not config:
        notes.insert(0, f"{where}: no adapter_config.json: scaling taken as "
                     + (f"alpha/r with alpha={alpha}" if alpha is not None
                        else "1 (norms are those of " + ("XΘYᵀ" if kind == "polar" else "BA") + "; pass --alpha)"))
    if any(m.group is not None for m in mods):
        notes.append(f"{where}: early-PEFT fused layers (enable_lora"
                     + ("" if config.get("enable_lora") else ", inferred from the shapes")
                     + "): one row per enabled group, named <module>[<group>]")
    mods = filter_modules(mods, modules)
    if not mods:
        raise AdapterFormatError(f"{where}: no adapted module matches --modules {modules!r}")
    return AdapterSource(path=where, adapter_type=kind, modules=mods, adapter_name=chosen, notes=notes, config=config)
