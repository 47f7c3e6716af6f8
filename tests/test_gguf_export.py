"""polar export --format gguf / polar.export_gguf: llama.cpp LoRA adapter files, read back with gguf's own reader.

ΔW is rebuilt from the file the way llama.cpp applies it (scale = alpha / rank with rank = lora_b's ne[0], or the
user scale alone when alpha = 0) and compared with PoLAR's (alpha_m / r_m)·X Θ Yᵀ; the q/k row order is checked
against the base conversion's permutation (written here from its description, independently of the library's).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import randomize_theta, tiny_gpt2, tiny_llama

import polar
from polar.cli import main

# tiny_llama: hidden 32, 4 heads (head_dim 8), 2 kv heads, intermediate 64, 2 layers.
N_HEAD, N_KV = 4, 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8.0
RANKS = {"down_proj": 2, "k_proj": 3}  # rank_pattern
ALPHAS = {"k_proj": 3.0, "up_proj": 20.0}  # alpha_pattern


def _scale(module: str) -> float:
    leaf = module.rsplit(".", 1)[-1]
    return ALPHAS.get(leaf, ALPHA) / RANKS.get(leaf, R)


def _adapter(tmp_path, **config):
    """A tiny Llama base folder and a PoLAR adapter folder (rank and alpha patterns, random Θ) recording it."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    settings = dict(r=R, alpha=ALPHA, target_modules=TARGETS, rank_pattern=dict(RANKS), alpha_pattern=dict(ALPHAS))
    settings.update(config)
    model = get_peft_model(tiny_llama(), polar.PolarConfig(**settings)).eval()
    randomize_theta(model, scale=2.0)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    return model, base_dir, adapter_dir


def _polar_deltas(adapter_dir) -> dict[str, np.ndarray]:
    """module -> ΔW (out, in) from the saved factors, with this test's own pattern arithmetic."""
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key in state:
        if key.endswith(".polar_X"):
            module = key.removesuffix(".polar_X").removeprefix("base_model.model.")
            x, y = state[key].double(), state[key.replace("polar_X", "polar_Y")].double()
            theta = state[key.replace("polar_X", "polar_theta")].double()
            assert x.shape[1] == RANKS.get(module.rsplit(".", 1)[-1], R)
            deltas[module] = (_scale(module) * x @ theta @ y.T).numpy()
    return deltas


def _hf_to_gguf_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The base conversion's q/k row permutation as llama.cpp describes it: reshape(heads, 2, rows/heads/2, ...),
    swap axes 1 and 2, reshape back."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _undo_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of :func:`_hf_to_gguf_permute`, by reading rows back through the forward order."""
    order = _hf_to_gguf_permute(np.arange(w.shape[0]), heads)
    out = np.empty_like(w)
    out[order] = w
    return out


def _read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _as_float(tensor) -> np.ndarray:
    """A tensor's values as numpy (rows = ggml ne[1]), dequantised."""
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    values = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
    return values.reshape(int(tensor.shape[1]), int(tensor.shape[0])).astype(np.float64)


def _gguf_deltas(path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> ΔW as llama.cpp applies it at user scale 1, in the GGUF (permuted) row order."""
    fields, tensors = _read(path)
    alpha = float(fields["adapter.lora.alpha"])
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name.removesuffix(".lora_a")
            a, b = tensors[name], tensors[f"{base}.lora_b"]
            rank = int(b.shape[0])  # ggml ne[0] of lora_b, as llama.cpp reads it
            assert int(a.shape[1]) == rank
            scale = alpha / rank if alpha else 1.0
            out[base] = scale * _as_float(b) @ _as_float(a)
    return out


def _expected_names() -> dict[str, str]:
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    out = {}
    for layer in range(2):
        for leaf, short in names.items():
            part = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            module = f"model.layers.{layer}.{part}.{leaf}"
            assert tmap.get_name(f"{module}.weight", try_suffixes=(".weight",)) == f"blk.{layer}.{short}.weight"
            out[module] = f"blk.{layer}.{short}.weight"
    return out


def _in_gguf_order(module: str, delta: np.ndarray) -> np.ndarray:
    if module.endswith("q_proj"):
        return _hf_to_gguf_permute(delta, N_HEAD)
    if module.endswith("k_proj"):
        return _hf_to_gguf_permute(delta, N_KV)
    return delta


def test_f32_gguf_applies_polar_delta_exactly_with_rank_and_alpha_patterns(tmp_path):
    model, base_dir, adapter_dir = _adapter(tmp_path)
    result = polar.export_gguf(adapter_dir, tmp_path / "adapter.gguf")
    assert result.path == tmp_path / "adapter.gguf" and result.architecture == "llama" and result.outtype == "f32"

    fields, tensors = _read(result.path)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert gguf.GGUFReader(result.path).fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    names = _expected_names()
    assert set(tensors) == {f"{n}.lora_{p}" for n in names.values() for p in "ab"}

    base = dict(tiny_llama().named_parameters())
    deltas = _polar_deltas(adapter_dir)
    got = _gguf_deltas(result.path)
    for module, name in names.items():
        rank = RANKS.get(module.rsplit(".", 1)[-1], R)
        w = base[f"{module}.weight"].detach().double().numpy()
        # ggml shapes: lora_a [n_in, r], lora_b [r, n_out]
        assert [int(d) for d in tensors[f"{name}.lora_a"].shape] == [w.shape[1], rank]
        assert [int(d) for d in tensors[f"{name}.lora_b"].shape] == [rank, w.shape[0]]
        assert tensors[f"{name}.lora_a"].tensor_type == gguf.GGMLQuantizationType.F32
        # llama.cpp adds B·A to the converted base weight: that must be the conversion of W + ΔW.
        want = _in_gguf_order(module, w + deltas[module]) - _in_gguf_order(module, w)
        err = np.abs(got[name] - want).max() / np.abs(want).max()
        assert err < 1e-6, (module, err)
        assert np.allclose(_undo_permute(got[name], N_HEAD) if module.endswith("q_proj") else
                           _undo_permute(got[name], N_KV) if module.endswith("k_proj") else got[name],
                           deltas[module], rtol=0, atol=1e-6 * np.abs(deltas[module]).max())


def test_q_k_rows_are_reordered_and_others_are_not(tmp_path):
    """The permutation is really applied (q/k differ from the unpermuted B·A), and only to q/k."""
    _, _, adapter_dir = _adapter(tmp_path)
    got = _gguf_deltas(polar.export_gguf(adapter_dir, tmp_path / "a.gguf").path)
    deltas = _polar_deltas(adapter_dir)
    for module, name in _expected_names().items():
        scale = np.abs(deltas[module]).max()
        same = np.allclose(got[name], deltas[module], atol=1e-6 * scale)
        assert same == (not module.endswith(("q_proj", "k_proj"))), module


@pytest.mark.parametrize("outtype,tolerance", [("f16", 2e-3), ("bf16", 1.6e-2), ("q8_0", 2e-2)])
def test_narrow_outtypes_round_within_their_precision(tmp_path, outtype, tolerance):
    _, _, adapter_dir = _adapter(tmp_path)
    result = polar.export_gguf(adapter_dir, tmp_path / "a.gguf", outtype=outtype)
    got = _gguf_deltas(result.path)
    _, tensors = _read(result.path)
    for module, name in _expected_names().items():
        want = _in_gguf_order(module, _polar_deltas(adapter_dir)[module])
        err = np.abs(got[name] - want).max() / np.abs(want).max()
        assert err < tolerance, (module, err)
    kinds = {name: gguf.GGMLQuantizationType(t.tensor_type).name for name, t in tensors.items()}
    if outtype == "q8_0":
        # lora_a rows have n_in (32 or 64) values: whole q8_0 blocks; lora_b rows have rank (< 32) values: F16.
        assert {k for n, k in kinds.items() if n.endswith("lora_a")} == {"Q8_0"}
        assert {k for n, k in kinds.items() if n.endswith("lora_b")} == {"F16"}
        assert result.f16_fallbacks == sorted(n for n in kinds if n.endswith("lora_b"))
        assert "F16, not Q8_0" in result.summary()
    else:
        assert set(kinds.values()) == {outtype.upper()}
        assert result.f16_fallbacks == []


def test_diagonal_theta_and_live_model_with_explicit_base(tmp_path):
    model, base_dir, _ = _adapter(tmp_path, theta="diagonal", rank_pattern={}, alpha_pattern={})
    model.peft_config["default"].base_model_name_or_path = None
    with pytest.raises(ValueError, match="records no base_model_name_or_path; pass the base model with --base"):
        polar.export_gguf(model, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    result = polar.export_gguf(model, tmp_path / "live.gguf", base=str(base_dir))
    got = _gguf_deltas(result.path)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x, y, theta = layer.polar_X["default"], layer.polar_Y["default"], layer.polar_theta["default"]
    want = (ALPHA / R * x @ torch.diag(theta) @ y.T).detach().double().numpy()
    assert np.allclose(got["blk.1.ffn_down.weight"], want, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
    "config,message",
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "module 'lm_head' is the token embedding / output head"),
        ({"bias": "all"}, "trains biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_refusals_name_the_module_and_write_nothing(tmp_path, config, message):
    _, _, adapter_dir = _adapter(tmp_path, **{"rank_pattern": {}, "alpha_pattern": {}, **config})
    with pytest.raises(ValueError, match=message):
        polar.export_gguf(adapter_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_architecture_and_wrong_base_are_refused(tmp_path):
    base_dir, adapter_dir = tmp_path / "gpt2", tmp_path / "gpt2_adapter"
    tiny_gpt2().save_pretrained(base_dir)
    model = get_peft_model(tiny_gpt2(), polar.PolarConfig(r=2, target_modules=["c_attn"]))
    model.save_pretrained(adapter_dir)
    with pytest.raises(ValueError, match=r"is a 'gpt2' model; GGUF export supports llama"):
        polar.export_gguf(adapter_dir, tmp_path / "g.gguf", base=str(base_dir))

    (tmp_path / "l").mkdir()
    _, _, llama_adapter = _adapter(tmp_path / "l")
    other = tmp_path / "other_base"
    wide = tiny_llama()
    wide.config.num_key_value_heads = 4  # a base without grouped-query attention: k_proj has 32 rows there
    wide.save_pretrained(other)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.k_proj' has 16 output rows but base "
                                         r".* has 4 heads of 8; the adapter was not trained on this base"):
        polar.export_gguf(llama_adapter, tmp_path / "w.gguf", base=str(other))
    assert not (tmp_path / "w.gguf").exists()
    with pytest.raises(ValueError, match="unknown outtype 'q4_0'"):
        polar.export_gguf(llama_adapter, tmp_path / "w.gguf", outtype="q4_0")


def test_overwrite_only_replaces_a_gguf_adapter_and_a_failed_write_leaves_the_old_file(tmp_path):
    model, _, adapter_dir = _adapter(tmp_path)
    out = tmp_path / "a.gguf"
    polar.export_gguf(adapter_dir, out)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="exists; to replace an earlier GGUF adapter pass overwrite=True"):
        polar.export_gguf(adapter_dir, out)
    polar.export_gguf(adapter_dir, out, overwrite=True, outtype="f16")
    assert out.read_bytes() != before

    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="is not a GGUF adapter"):
        polar.export_gguf(adapter_dir, notes, overwrite=True)
    assert notes.read_text() == "my notes"
    with pytest.raises(ValueError, match="lies inside the source"):
        polar.export_gguf(adapter_dir, adapter_dir / "adapter.gguf")

    # Fault: a Θ that overflows f16 fails the export midway (after the earlier tensors were encoded): the earlier
    # output is left byte for byte, and no temporary file is left beside it.
    current = out.read_bytes()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.polar_theta["default"].fill_(1e6)
    with pytest.raises(ValueError, match=r"tensor blk\.1\.ffn_down\.weight\.lora_b overflows F16"):
        polar.export_gguf(model, out, overwrite=True, outtype="f16")
    assert out.read_bytes() == current
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    _, base_dir, adapter_dir = _adapter(tmp_path)
    out = tmp_path / "cli.gguf"
    assert main(["export", str(adapter_dir), str(out), "--format", "gguf", "--outtype", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote llama.cpp LoRA adapter to {out} (12 modules, architecture llama, q8_0")
    assert _read(out)[0]["general.type"] == "adapter"

    cases = [
        (["export", str(adapter_dir), str(out), "--format", "gguf"], "exists; to replace"),
        (["export", str(adapter_dir), str(tmp_path / "x.gguf"), "--format", "gguf", "--base", str(tmp_path)],
         "cannot read the config.json of the base model"),
        (["export", str(adapter_dir), str(tmp_path / "lora"), "--outtype", "f16"], "--outtype apply to --format gguf"),
        (["export", str(adapter_dir), str(tmp_path / "y.gguf")], "names a .gguf file but --format is lora"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "lora").exists()
    assert main(["export", str(adapter_dir), str(out), "--format", "gguf", "--overwrite",
                 "--base", str(base_dir)]) == 0


def test_a_write_failing_midway_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    """Fault injected into gguf's writer (disk full while the tensors are written): the earlier adapter file is left
    byte for byte and nothing else appears beside it."""
    _, _, adapter_dir = _adapter(tmp_path)
    out = tmp_path / "a.gguf"
    polar.export_gguf(adapter_dir, out)
    before = out.read_bytes()
    written = gguf.GGUFWriter.write_tensors_to_file

    def disk_full(self, *args, **kwargs):
        written(self, *args, **kwargs)
        for handle in self.fout or []:
            handle.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        polar.export_gguf(adapter_dir, out, overwrite=True, outtype="f16")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "adapter", "base"]


def test_qwen2_base_gets_its_architecture_and_no_row_reordering(tmp_path):
    """llama.cpp converts Qwen2 weights without the Llama q/k reordering: lora_b keeps the Hugging Face row order."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base_dir, adapter_dir = tmp_path / "qwen2", tmp_path / "adapter"
    Qwen2ForCausalLM(config).save_pretrained(base_dir)
    model = get_peft_model(Qwen2ForCausalLM(config), polar.PolarConfig(
        r=4, target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"k_proj": 2}))
    randomize_theta(model)
    model.save_pretrained(adapter_dir)
    result = polar.export_gguf(adapter_dir, tmp_path / "q.gguf", base=str(base_dir))
    fields, _ = _read(result.path)
    assert fields["general.architecture"] == "qwen2" and result.architecture == "qwen2"
    got = _gguf_deltas(result.path)
    assert sorted(got) == [f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_k", "attn_q", "ffn_down")]
    for name, module, scale in (("blk.0.attn_q.weight", "q_proj", 16 / 4), ("blk.1.attn_k.weight", "k_proj", 16 / 2)):
        layer = getattr(model.base_model.model.model.layers[int(name[4])].self_attn, module)
        x, y, theta = (p["default"].detach().double() for p in (layer.polar_X, layer.polar_Y, layer.polar_theta))
        want = (scale * x @ theta @ y.T).numpy()
        assert np.allclose(got[name], want, atol=1e-6 * np.abs(want).max()), name
