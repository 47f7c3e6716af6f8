"""polar.formats: reference-code PoLAR (each parameterize_S), early-PEFT fused qkv, and the readers' contracts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import polar
from polar.analysis import analyze
from polar.cli import main
from polar.formats import AdapterFormatError, adapter_kind, read_path
from polar.tuner.model import delta_weights
from reference_checkpoints import write_reference_checkpoint

FUSED = Path(__file__).parent / "fixtures" / "early_peft_fused_qkv"
TARGETS = ("q_proj", "v_proj")


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _svd(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.double())


@pytest.mark.parametrize("mode,keep_name,fmt", [("identity", True, "safetensors"), ("diagonal", True, "bin"),
                                                ("removal", False, "safetensors")])
def test_convert_reference_follows_parameterize_s(tmp_path, one_thread, mode, keep_name, fmt):
    expected = write_reference_checkpoint(tmp_path / "ref", tiny_llama(), TARGETS, parameterize_s=mode,
                                          keep_adapter_name=keep_name, fmt=fmt)
    out = polar.convert_reference(tmp_path / "ref", tmp_path / "converted")
    model = PeftModel.from_pretrained(tiny_llama(), out)
    deltas = {k.removeprefix("base_model.model."): v for k, v in delta_weights(model).items()}
    assert set(deltas) == set(expected)
    for key, delta in deltas.items():
        torch.testing.assert_close(delta, expected[key], rtol=1e-5, atol=1e-5)
    config = model.peft_config["default"]
    assert config.theta == ("diagonal" if mode == "diagonal" else "full")
    assert config.dropout == 0.05
    thetas = [p for n, p in model.named_parameters() if "polar_theta" in n]
    if mode == "removal":  # Θ = I (the stored random S is ignored), trainable unless frozen
        assert all(torch.equal(t, torch.eye(4)) for t in thetas)
    record = json.loads((out / "conversion.json").read_text())
    assert record["parameterize_S"] == mode and record["theta_trainable_in_reference"] == (mode != "removal")


@pytest.mark.parametrize("mode", ["identity", "diagonal", "removal"])
def test_analyze_reference_follows_parameterize_s(tmp_path, mode):
    expected = write_reference_checkpoint(tmp_path / "ref", tiny_llama(), TARGETS, parameterize_s=mode)
    df = analyze(tmp_path / "ref")
    assert set(df["adapter_type"]) == {"polar-reference"}
    assert set(df["theta"]) == {{"identity": "full", "diagonal": "diagonal", "removal": "removal"}[mode]}
    for _, row in df.iterrows():
        dense = _svd(expected[row["module"]])
        got = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, dense[: got.numel()], rtol=1e-5, atol=1e-6)
        ratio = float((dense**2).sum() / dense[0] ** 2)
        assert row["stable_rank"] == pytest.approx(ratio, rel=1e-5)
        assert row["orth_error_x"] < 1e-5 and row["orth_error_y"] < 1e-5


def test_reference_theta_option_and_recorded_value(tmp_path, capsys):
    expected = write_reference_checkpoint(tmp_path / "old", tiny_llama(), TARGETS, parameterize_s="diagonal",
                                          record_parameterize_s=False)
    src = read_path(tmp_path / "old")  # not recorded: the reference's default word, identity (S free)
    assert {m.theta for m in src.modules} == {"full"}
    assert any("without parameterize_S" in n for n in src.notes)
    src = read_path(tmp_path / "old", reference_theta="diagonal")
    md = src.modules[0]
    torch.testing.assert_close(md.dense_delta().float(), expected[md.module], rtol=1e-5, atol=1e-6)
    out = polar.convert_reference(tmp_path / "old", tmp_path / "conv", parameterize_s="diagonal")
    assert json.loads((out / "adapter_config.json").read_text())["theta"] == "diagonal"

    write_reference_checkpoint(tmp_path / "new", tiny_llama(), TARGETS, parameterize_s="removal")
    with pytest.raises(AdapterFormatError, match="says parameterize_S='removal', but 'identity' was requested"):
        read_path(tmp_path / "new", reference_theta="identity")
    with pytest.raises(AdapterFormatError, match="knows identity, diagonal, removal"):
        read_path(tmp_path / "old", reference_theta="full")
    assert main(["analyze", str(tmp_path / "new"), "--reference-theta", "removal"]) == 0
    assert main(["analyze", str(tmp_path / "new"), "--reference-theta", "diagonal"]) == 2
    assert "says parameterize_S='removal'" in capsys.readouterr().err

    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterFormatError, match="reference-code PoLAR checkpoints .* only; this is a lora"):
        read_path(tmp_path / "lora", reference_theta="identity")


def test_convert_cli_and_plain_lora_is_refused(tmp_path):
    write_reference_checkpoint(tmp_path / "ref", tiny_llama(), TARGETS, parameterize_s="identity")
    assert main(["convert", str(tmp_path / "ref"), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "POLAR" and config["optimizer_mode"] == "riemannian"  # the library default
    # a λ for further training means the paper's landing field, recorded as such (else it would be ignored)
    assert main(["convert", str(tmp_path / "ref"), str(tmp_path / "out_l"), "--landing-lambda", "0.005"]) == 0
    config = json.loads((tmp_path / "out_l" / "adapter_config.json").read_text())
    assert (config["optimizer_mode"], config["landing_lambda"]) == ("landing", 0.005)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds no lora_S tensors.*not a PoLAR reference adapter"):
        polar.convert_reference(tmp_path / "lora", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert adapter_kind(tmp_path / "ref") == "polar-reference" and adapter_kind(tmp_path / "lora") == "lora"
    assert adapter_kind(tmp_path / "out") == "polar"


def test_evaluate_refuses_reference_and_fused_adapters(tmp_path):
    write_reference_checkpoint(tmp_path / "ref", tiny_llama(), TARGETS, parameterize_s="identity")
    with pytest.raises(ValueError, match="PEFT would drop its S. Convert it first: polar convert"):
        polar.evaluate(tmp_path / "ref", tasks="glue:sst2", base_model="unused")
    with pytest.raises(ValueError, match="early-PEFT fused-qkv LoRA adapter"):
        polar.evaluate(FUSED / "adapter", tasks="glue:sst2", base_model="unused")


def test_early_peft_fused_qkv_one_delta_per_enabled_group(tmp_path):
    expected = load_file(str(FUSED / "expected_delta.safetensors"))  # ΔW as peft 0.2.0's forward applies it
    df = analyze(FUSED / "adapter")
    assert df["module"].tolist() == [f"transformer.h.{i}.attn.c_attn[{g}]" for i in (0, 1) for g in (0, 2)]
    assert df["layer"].tolist() == [0, 0, 1, 1]
    assert df["shape"].tolist() == ["16x16"] * 4
    o = 16  # out_features 48 = 3 groups of 16; group g holds rows g·16 … (g+1)·16
    for _, row in df.iterrows():
        module, group = row["module"][:-3], int(row["module"][-2])
        block = expected[module][group * o:(group + 1) * o]
        dense = _svd(block)
        got = torch.tensor(row["singular_values"], dtype=torch.float64)
        torch.testing.assert_close(got, dense[: got.numel()], rtol=1e-5, atol=1e-5)
        assert row["stable_rank"] == pytest.approx(float((dense**2).sum() / dense[0] ** 2), rel=1e-5)
    for module, delta in expected.items():  # the k block peft 0.2.0 left alone is zero, and we report no row for it
        assert torch.count_nonzero(delta[o:2 * o]) == 0
    # without adapter_config.json the groups are inferred from the shapes (scaling then 1: ranks unchanged)
    shutil.copy(FUSED / "adapter" / "adapter_model.bin", tmp_path / "raw.bin")
    raw = analyze(tmp_path / "raw.bin")
    assert raw["module"].tolist() == [f"transformer.h.{i}.attn.c_attn[{g}]" for i in (0, 1) for g in (0, 1)]
    assert raw["stable_rank"].tolist() == pytest.approx(df["stable_rank"].tolist(), rel=1e-9)
    assert any("inferred from the shapes" in n for n in raw.attrs["notes"])
    # a config whose enable_lora contradicts the tensors is refused
    bad = tmp_path / "bad"
    shutil.copytree(FUSED / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["enable_lora"] = [True, True, True]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=r"enable_lora \[True, True, True\] enables 3 groups"):
        analyze(bad)
