"""One definition of a module's rank, alpha and scale (polar.scaling.module_scaling), checked against PEFT's own
per-layer ``scaling``; the tuner, the readers and the exports all give what it gives."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from tiny_models import randomize_theta, tiny_llama

import polar
from polar.formats import AdapterFormatError, read_adapter_config, read_path
from polar.scaling import ModuleScaling, module_scaling
from polar.tuner import delta_weights, iter_polar_layers

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]
# Keys of each kind PEFT accepts: a bare suffix ("v_proj" matches every v_proj), a regex over the dotted path
# (layer 1's q_proj only), an anchored full name, a key whose text ends a name but not at a dot ("proj" matches
# nothing: "q_proj" is not ".proj"), and keys matching no module at all.
RANK_PATTERN = {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3, "proj": 7, "no_such_proj": 5}
ALPHA_PATTERN = {".*_proj": 5.0, "o_proj": 9.0, r"^model\.layers\.0\.mlp\.up_proj$": 2.5, "missing": 1.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(build):
    """PEFT warns about pattern keys that match no module (here on purpose)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return build()


def _lora_model(**settings) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **settings)
    return _quiet(lambda: get_peft_model(tiny_llama(), config))


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_of_every_module_is_the_one_peft_gives_its_lora_layer(tmp_path: Path, rslora: bool) -> None:
    model = _lora_model(rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, use_rslora=rslora)
    model.save_pretrained(tmp_path)
    saved = read_adapter_config(tmp_path)  # the dict as adapter_config.json holds it
    layers = _lora_layers(model)
    assert len(layers) == 8
    for name, layer in layers.items():
        peft_says = (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"])
        for config in (model.peft_config["default"], saved):
            got = module_scaling(config, name)
            assert (got.r, got.alpha, got.scale) == peft_says, (name, config is saved)
    # the cases the patterns were chosen for (what PEFT did above, spelled out)
    q0, q1, up0 = (module_scaling(saved, f"model.layers.{i}.{m}") for i, m in
                   ((0, "self_attn.q_proj"), (1, "self_attn.q_proj"), (0, "mlp.up_proj")))
    assert (q0.r, q1.r, up0.r) == (4, 3, 4)  # "proj" and "no_such_proj" match nothing: r
    assert (q0.alpha, up0.alpha) == (5.0, 5.0)  # ".*_proj" comes first and wins over the later exact key


def test_polar_layers_take_the_scale_peft_gives_lora_for_the_same_patterns(tmp_path: Path) -> None:
    """The tuner resolves PoLAR's patterns exactly as PEFT's LoRA resolves the same ones (an independent model)."""
    lora = _lora_layers(_lora_model(rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN))
    config = polar.PolarConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                               alpha_pattern=ALPHA_PATTERN)
    model = _quiet(lambda: get_peft_model(tiny_llama(), config))
    randomize_theta(model)
    polar_layers = {n.removeprefix("base_model.model."): layer for n, layer in iter_polar_layers(model)}
    assert polar_layers.keys() == lora.keys()
    for name, layer in polar_layers.items():
        assert (layer.r["default"], layer.scaling["default"]) == (lora[name].r["default"],
                                                                  lora[name].scaling["default"]), name
    # ... and the readers give the same scale from the saved files
    model.save_pretrained(tmp_path / "polar")
    read = {md.module: md.scale for md in read_path(tmp_path / "polar").modules}
    assert read == {name: lora[name].scaling["default"] for name in lora}


def test_lora_export_scales_every_module_by_one_and_equals_the_polar_update(tmp_path: Path) -> None:
    config = polar.PolarConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                               alpha_pattern=ALPHA_PATTERN)
    model = _quiet(lambda: get_peft_model(tiny_llama(), config))
    randomize_theta(model)
    deltas = delta_weights(model)
    out = polar.export_lora(model, tmp_path / "lora")
    exported = read_adapter_config(out)
    loaded = _quiet(lambda: PeftModel.from_pretrained(tiny_llama(), out))
    for name, layer in _lora_layers(loaded).items():
        assert module_scaling(exported, name).scale == layer.scaling["default"] == 1.0
        delta = layer.get_delta_weight("default").double()
        assert torch.allclose(delta, deltas[f"base_model.model.{name}"].double(), atol=1e-6), name


def test_config_kinds_and_defaults() -> None:
    polar_dict = {"peft_type": "POLAR", "r": 4, "alpha": 8, "use_rslora": True, "lora_alpha": 3}
    assert module_scaling(polar_dict, "m") == ModuleScaling(4, 8.0)  # PoLAR reads alpha; no rsLoRA in PoLAR
    assert module_scaling({"r": 4, "alpha": 8}, "m").scale == 2.0  # no peft_type: PoLAR's field
    assert module_scaling({"r": 4, "lora_alpha": 8, "use_rslora": True}, "m").scale == 4.0  # 8 / √4
    assert module_scaling({"r": 4}, "m").scale == 1.0  # no alpha: alpha = r
    assert module_scaling({"lora_alpha": 6}, "m", r=3).scale == 2.0  # the tensors' rank, for readers
    assert module_scaling({"r": 4, "rank_pattern": {"m": 2}}, "a.m").r == 2
    with pytest.raises(ValueError, match="gives module 'm' no rank"):
        module_scaling({"lora_alpha": 8}, "m")


def test_export_of_an_incomplete_module_names_the_file_and_the_remedy(tmp_path: Path) -> None:
    """Export reads the adapter through polar.formats: its messages name the file, module and what to do."""
    model = get_peft_model(tiny_llama(), polar.PolarConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(weights))
    gone = next(k for k in state if k.endswith("layers.1.self_attn.q_proj.polar_theta"))
    save_file({k: v for k, v in state.items() if k != gone}, str(weights))
    with pytest.raises(AdapterFormatError) as err:
        polar.export_lora(tmp_path / "a", tmp_path / "out")
    message = str(err.value)
    assert str(weights) in message and "'model.layers.1.self_attn.q_proj' lacks polar_theta" in message
    assert "re-save the adapter" in message
    assert not (tmp_path / "out").exists()


def _private_imports(path: Path) -> list[str]:
    """``from polar... import _name`` in a file: one module reaching into another's private names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("polar")):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_scaling_readers_and_exports_import_no_private_names() -> None:
    files = [ROOT / "polar" / name for name in ("conversion.py", "gguf_export.py", "scaling.py", "tuner/model.py")] + [
        *sorted((ROOT / "polar" / "formats").glob("*.py")), *sorted((ROOT / "polar" / "analysis").glob("*.py"))]
    assert {f.name: _private_imports(f) for f in files if _private_imports(f)} == {}


def test_one_pattern_resolver() -> None:
    """No module but polar/scaling.py calls PEFT's pattern matcher or reads alpha_pattern itself."""
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "polar").rglob("*.py")
                   if "get_pattern_key" in p.read_text(encoding="utf-8")
                   or "alpha_pattern.get(" in p.read_text(encoding="utf-8"))
    assert users == ["polar/scaling.py"]
