"""polar analyze: readers for every adapter format, the table, CSV/JSON, plots, CLI and error messages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import polar
from polar.analysis import AdapterFormatError, analyze, format_summary, read_table, write_csv, write_json
from polar.analysis.plots import plot_analysis, row_distance_matrix
from polar.formats import read_path
from polar.cli import main

REQUIRED = ["module", "shape", "r", "stable_rank", "effective_rank", "fro_norm", "spectral_norm", "orth_error_x",
            "orth_error_y"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _svd(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta.detach().double())


def _assert_sv(row_sv, dense_sv: torch.Tensor, rel: float = 1e-6) -> None:
    got = torch.tensor(row_sv, dtype=torch.float64)
    n = got.numel()
    assert torch.all(dense_sv[n:] <= rel * dense_sv[0] + 1e-12)
    torch.testing.assert_close(got, dense_sv[:n], rtol=rel, atol=rel * float(dense_sv[0]))


def _polar_model(theta: str, seed: int):
    model = get_peft_model(tiny_llama(seed), polar.PolarConfig(r=4, alpha=8, target_modules=TARGETS, theta=theta))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "polar_theta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "polar_X" in name or "polar_Y" in name:  # drifted factors: not orthonormal any more
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _lora_model(use_dora: bool, seed: int):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora, init_lora_weights=False,
                     alpha_pattern={"down_proj": 16})
    model = get_peft_model(tiny_llama(seed), cfg)
    if use_dora:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {"root": root}
    for theta in ("full", "diagonal"):
        model = _polar_model(theta, seed=1)
        model.save_pretrained(root / f"polar_{theta}")
        out[f"polar_{theta}"] = model
    lora = _lora_model(False, seed=2)
    lora.save_pretrained(root / "lora")
    out["lora"] = lora
    tiny_llama(3).save_pretrained(root / "base")
    dora = get_peft_model(tiny_llama(3), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                   init_lora_weights=False))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    dora.save_pretrained(root / "dora")
    out["dora"] = dora
    return out


def _layers(model):
    return {name.removeprefix("base_model.model."): mod for name, mod in model.named_modules()
            if hasattr(mod, "get_delta_weight") and (hasattr(mod, "polar_X") or hasattr(mod, "lora_A"))}


@pytest.mark.parametrize("theta", ["full", "diagonal"])
def test_polar_folder_matches_dense_svd(adapters, theta):
    model = adapters[f"polar_{theta}"]
    df = analyze(adapters["root"] / f"polar_{theta}")
    layers = _layers(model)
    assert len(df) == len(layers) == 2 * len(TARGETS)
    assert set(df["adapter_type"]) == {"polar"} and set(df["theta"]) == {theta}
    for _, row in df.iterrows():
        layer = layers[row["module"]]
        dense = layer.get_delta_weight("default").detach()
        sv = _svd(dense)
        _assert_sv(row["singular_values"], sv)
        assert row["stable_rank"] == pytest.approx(float((sv ** 2).sum() / sv[0] ** 2), rel=1e-6)
        assert row["fro_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense.double())), rel=1e-6)
        assert row["spectral_norm"] == pytest.approx(float(sv[0]), rel=1e-6)
        x = layer.polar_X["default"].detach().double()
        err = torch.linalg.matrix_norm(x.T @ x - torch.eye(4, dtype=torch.float64))
        assert row["orth_error_x"] == pytest.approx(float(err), rel=1e-6) and row["orth_error_x"] > 1e-3
        assert row["orth_error_y"] > 1e-3
        assert row["shape"] == f"{dense.shape[0]}x{dense.shape[1]}"
        assert row["r"] == 4 and row["scaling"] == pytest.approx(2.0)
    # a live model gives the same table
    live = analyze(model)
    merged = df.merge(live, on="module", suffixes=("", "_live"))
    np.testing.assert_allclose(merged["stable_rank"], merged["stable_rank_live"], rtol=1e-9)


def test_lora_folder_matches_dense_svd_with_alpha_pattern(adapters):
    model = adapters["lora"]
    df = analyze(adapters["root"] / "lora")
    layers = _layers(model)
    assert set(df["adapter_type"]) == {"lora"}
    assert df["orth_error_x"].isna().all()
    for _, row in df.iterrows():
        layer = layers[row["module"]]
        _assert_sv(row["singular_values"], _svd(layer.get_delta_weight("default")))
        assert row["scaling"] == pytest.approx(4.0 if row["module_type"] == "down_proj" else 2.0)
    assert set(df["module_type"]) == {"q_proj", "v_proj", "down_proj"}
    assert set(df["layer"].tolist()) == {0, 1}


def test_dora_exact_with_base_model_and_directional_without(adapters):
    root = adapters["root"]
    dora = adapters["dora"]
    base = tiny_llama(3)
    exact = analyze(root / "dora", base_model=root / "base")
    assert set(exact["delta"]) == {"full"}
    merged_model = get_peft_model(tiny_llama(3), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          use_dora=True, init_lora_weights=False))
    merged_model.load_state_dict(dora.state_dict())
    merged = dict(merged_model.merge_and_unload().named_parameters())
    base_params = dict(base.named_parameters())
    for _, row in exact.iterrows():
        key = f"{row['module']}.weight"
        sv = _svd(merged[key] - base_params[key])
        got = torch.tensor(row["singular_values"], dtype=torch.float64)
        # the exact DoRA update is full rank: compare the leading values kept in the table
        torch.testing.assert_close(got, sv[: got.numel()], rtol=1e-6, atol=1e-6 * float(sv[0]))
        assert row["stable_rank"] == pytest.approx(float((sv ** 2).sum() / sv[0] ** 2), rel=1e-6)
    directional = analyze(root / "dora")
    assert set(directional["delta"]) == {"directional"}
    assert any("directional" in n for n in directional.attrs["notes"])
    assert "directional" in format_summary(directional)
    layers = _layers(dora)
    for _, row in directional.iterrows():
        layer = layers[row["module"]]
        ba = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        _assert_sv(row["singular_values"], _svd(ba))
    # live DoRA model: the layer's own base weight gives the exact update
    live = analyze(dora)
    np.testing.assert_allclose(live.sort_values("module")["stable_rank"], exact.sort_values("module")["stable_rank"],
                               rtol=1e-9)


def test_raw_state_dicts_bin_and_safetensors(tmp_path):
    gen = torch.Generator().manual_seed(7)
    a0, b0 = torch.randn(4, 24, generator=gen), torch.randn(40, 4, generator=gen)
    a1, b1 = torch.randn(4, 24, generator=gen), torch.randn(40, 4, generator=gen)
    # loralib-style keys (no ".weight"), saved with torch.save, nested under "model" like some checkpoints
    loralib = {"deberta.encoder.layer.0.attention.self.query_proj.lora_A": a0,
               "deberta.encoder.layer.0.attention.self.query_proj.lora_B": b0,
               "deberta.encoder.layer.1.attention.self.query_proj.lora_A": a1,
               "deberta.encoder.layer.1.attention.self.query_proj.lora_B": b1,
               "deberta.encoder.layer.0.attention.self.query_proj.weight": torch.randn(40, 24)}
    torch.save({"model": loralib}, tmp_path / "lora.bin")
    df = analyze(tmp_path / "lora.bin")
    assert len(df) == 2 and set(df["adapter_type"]) == {"lora"}
    assert df["layer"].tolist() == [0, 1]
    assert df["module_type"].tolist() == ["query_proj", "query_proj"]
    _assert_sv(df.iloc[0]["singular_values"], _svd(b0 @ a0))
    assert any("no adapter_config.json" in n for n in df.attrs["notes"])
    scaled = analyze(tmp_path / "lora.bin", alpha=8)
    assert scaled.iloc[0]["spectral_norm"] == pytest.approx(2 * df.iloc[0]["spectral_norm"])
    assert scaled.iloc[0]["stable_rank"] == pytest.approx(df.iloc[0]["stable_rank"])

    # PEFT-style keys in a .safetensors file, also as a .pt
    sd = {"base_model.model.model.layers.3.mlp.up_proj.lora_A.weight": a0.contiguous(),
          "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight": b0.contiguous()}
    save_file(sd, str(tmp_path / "peft_style.safetensors"))
    torch.save(sd, tmp_path / "peft_style.pt")
    for name in ("peft_style.safetensors", "peft_style.pt"):
        df = analyze(tmp_path / name)
        assert df["module"].tolist() == ["model.layers.3.mlp.up_proj"]
        assert df["layer"].tolist() == [3]
        _assert_sv(df.iloc[0]["singular_values"], _svd(b0 @ a0))


def test_table_schema_csv_json_roundtrip(adapters, tmp_path):
    df = analyze([adapters["root"] / "polar_full", adapters["root"] / "lora"], labels=["PoLAR", "LoRA"])
    for col in REQUIRED + ["adapter_type", "layer", "module_type", "path", "label", "singular_values", "sigma_1",
                           "sigma_8"]:
        assert col in df.columns, col
    assert set(df["label"]) == {"PoLAR", "LoRA"}
    assert df.loc[df["label"] == "LoRA", "sigma_5"].isna().all()  # r = 4: only 4 singular values
    csv_path = write_csv(df, tmp_path / "out" / "analysis.csv")
    json_path = write_json(df, tmp_path / "out" / "analysis.json")
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temp files
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[: len(df.columns)] == list(df.columns)
    doc = json.loads(json_path.read_text())
    assert doc["format"] == "polar-analyze" and doc["version"] == 1
    assert doc["columns"] == list(df.columns) and len(doc["rows"]) == len(df)
    lora_row = next(r for r in doc["rows"] if r["label"] == "LoRA")
    assert lora_row["orth_error_x"] is None and isinstance(lora_row["singular_values"], list)
    for path in (csv_path, json_path):
        back = read_table(path)
        assert list(back.columns) == list(df.columns)
        np.testing.assert_allclose(back["stable_rank"], df["stable_rank"], rtol=1e-8)
        assert back["singular_values"].iloc[0] == pytest.approx(df["singular_values"].iloc[0], rel=1e-8)
    summary = format_summary(df)
    assert "by module type" in summary and "by layer" in summary and "median" in summary


def test_modules_filter(adapters):
    df = analyze(adapters["root"] / "polar_full", modules=r"layers\.1\..*q_proj")
    assert df["module"].tolist() == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(AdapterFormatError, match="no adapted module matches"):
        analyze(adapters["root"] / "polar_full", modules="nothing_like_this")


def test_row_distance_matrix_matches_dense(adapters):
    model = adapters["polar_full"]
    src = read_path(adapters["root"] / "polar_full", modules="layers.0.mlp.down_proj")
    md = src.modules[0]
    dist, rows = row_distance_matrix(md)
    dense = _layers(model)[md.module].get_delta_weight("default").detach().double()
    u = dense / dense.norm(dim=1, keepdim=True)
    ref = torch.cdist(u, u).numpy()
    np.testing.assert_allclose(dist, ref[np.ix_(rows, rows)], atol=1e-6)
    assert sorted(rows.tolist()) == list(range(dense.shape[0]))


def test_plots_written_and_non_empty(adapters, tmp_path):
    from polar.analysis.report import analyze_sources, load_sources

    sources = load_sources([adapters["root"] / "polar_full", adapters["root"] / "lora", adapters["root"] / "dora"],
                           base_model=adapters["root"] / "base")
    df = analyze_sources(sources)
    written = plot_analysis(df, tmp_path, sources=sources, heatmap=["layers.1.mlp.down_proj"])
    names = {p.name for p in written}
    for stem in ("stable_rank_by_layer", "spectra", "stable_rank_comparison"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    heatmaps = [n for n in names if n.startswith("row_distances_")]
    assert len(heatmaps) == 6  # one module in each of three adapters, PNG + SVG
    for p in written:
        assert p.stat().st_size > 1000, p
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert b"<svg" in p.read_bytes()[:2000]


def test_cli_analyze_end_to_end(adapters, tmp_path, capsys):
    root = adapters["root"]
    out = tmp_path / "report"
    code = main(["analyze", str(root / "polar_full"), str(root / "lora"), "--out", str(out), "--labels", "PoLAR",
                 "LoRA", "--heatmap", "layers.0.self_attn.q_proj", "--show-table"])
    assert code == 0
    captured = capsys.readouterr()
    assert "== PoLAR" in captured.out and "== LoRA" in captured.out and "stable_rank" in captured.out
    for name in ("analysis.csv", "analysis.json", "summary.txt", "stable_rank_by_layer.png", "spectra.svg",
                 "stable_rank_comparison.png"):
        assert (out / name).stat().st_size > 0, name
    assert list(out.glob("row_distances_PoLAR_*q_proj.png"))
    df = read_table(out / "analysis.csv")
    assert len(df) == 12 and set(df["label"]) == {"PoLAR", "LoRA"}

    # DoRA with and without base model through the CLI
    assert main(["analyze", str(root / "dora"), "--base-model", str(root / "base")]) == 0
    assert "directional" not in capsys.readouterr().out
    assert main(["analyze", str(root / "dora")]) == 0
    assert "directional" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    assert main(["analyze", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no recognisable adapter" in err and "notes.txt" in err and "lora_A" in err

    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    assert main(["analyze", str(tmp_path / "plain.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj.weight" in err and "expected" in err

    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_mixed_adapter_names(tmp_path, capsys):
    gen = torch.Generator().manual_seed(9)
    sd = {}
    for name in ("task_a", "task_b"):
        sd[f"base_model.model.model.layers.0.mlp.up_proj.lora_A.{name}.weight"] = torch.randn(2, 8, generator=gen)
        sd[f"base_model.model.model.layers.0.mlp.up_proj.lora_B.{name}.weight"] = torch.randn(8, 2, generator=gen)
    save_file(sd, str(tmp_path / "two.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"'task_a', 'task_b'.*--adapter-name"):
        analyze(tmp_path / "two.safetensors")
    assert main(["analyze", str(tmp_path / "two.safetensors")]) == 2
    assert "task_a" in capsys.readouterr().err
    df = analyze(tmp_path / "two.safetensors", adapter_name="task_b")
    assert df["adapter_name"].tolist() == ["task_b"]
    assert main(["analyze", str(tmp_path / "two.safetensors"), "--adapter-name", "task_a"]) == 0

    # a live model with two adapters, and a folder saved from it (PEFT: default at the root, others in sub-folders)
    model = get_peft_model(tiny_llama(4), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(AdapterFormatError, match=r"'default', 'other'"):
        analyze(model)
    assert len(analyze(model, adapter_name="other")) == 2
    model.save_pretrained(tmp_path / "multi", selected_adapters=["default", "other"])
    with pytest.raises(AdapterFormatError, match="several adapters.*other"):
        analyze(tmp_path / "multi")
    assert analyze(tmp_path / "multi", adapter_name="other")["r"].tolist() == [2, 2]


def test_unsupported_peft_type(tmp_path):
    folder = tmp_path / "ia3"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    save_file({"base_model.model.x.ia3_l": torch.ones(3)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="IA3"):
        analyze(folder)


def test_zero_update_gives_nan_ranks():
    model = get_peft_model(tiny_llama(5), polar.PolarConfig(r=4, alpha=8, target_modules=["q_proj"]))
    df = analyze(model)  # Θ = 0 at initialisation
    assert df["stable_rank"].isna().all() and (df["fro_norm"] == 0).all()
    assert (df["orth_error_x"] < 1e-5).all()
    assert not math.isnan(df["orth_error_y"].iloc[0])


def test_bad_regex_and_wrong_adapter_name(adapters, capsys):
    folder = str(adapters["root"] / "lora")
    assert main(["analyze", folder, "--modules", "("]) == 2
    assert "invalid modules regular expression" in capsys.readouterr().err
    with pytest.raises(AdapterFormatError, match="single adapter.*'nope'"):
        analyze(folder, adapter_name="nope")
    assert len(analyze(folder, adapter_name="default")) == 2 * len(TARGETS)
