"""PoLAR's rows for PEFT's own test matrix (tests/test_custom_models.py of the installed PEFT version).

``run_peft.py`` appends each list below to the PEFT list of the same name before the test module is collected, so
every parametrised test of the matrix runs on these rows exactly as it runs on LoRA's. The rows follow PEFT's
conventions: ``TEST_CASES`` rows are ``(test name, model id, config class, config kwargs)``; multiple-active-adapter
rows carry two kwargs dicts; mixed-batch rows carry two config instances. The model ids name PEFT's test models
("MLP": Linear(10, 20) → Linear(20, 2); "EmbConv1D": an embedding into transformers' Conv1D(nf=1, nx=5)), so the
ranks respect min(in, out) of each targeted layer: lin1 and conv1d allow r ≤ 2 and r = 1. Rows with lin1 at r = 2 set
alpha = 2 (scaling alpha / r = 1, LoRA's default scaling): the default alpha = 16 would scale ΔW by 8, and the
matrix's plain-SGD steps at lr 0.5 on inputs up to 90 then overflow to NaN, as PEFT lowers lr for DoRA and others.

Trainable biases (``bias="all"`` / ``"polar_only"``) have no row of their own, as LoRA's have none: a row applies
to the tests that add a second adapter with the same config, and only one adapter may train biases. PEFT's
``test_save_load_roundtrip_fsdp_wrapped_learnable_bias`` sets both bias values on every row instead.

Every test name contains "PoLAR": the runner selects the matrix's PoLAR cases with ``-k PoLAR``.
"""

from __future__ import annotations

from polar import PolarConfig

TEST_CASES = [
    # Targets by regex string, by one-name list, by list; a saved head; dropout with alpha.
    ("Vanilla MLP 1 PoLAR", "MLP", PolarConfig, {"target_modules": "lin0", "r": 4}),
    ("Vanilla MLP 2 PoLAR", "MLP", PolarConfig, {"target_modules": ["lin0"], "r": 4}),
    ("Vanilla MLP 3 PoLAR", "MLP", PolarConfig, {"target_modules": ["lin1"], "r": 2, "alpha": 2}),
    ("Vanilla MLP 4 PoLAR", "MLP", PolarConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 2}),
    ("Vanilla MLP 5 PoLAR", "MLP", PolarConfig, {"target_modules": ["lin0"], "r": 4, "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 PoLAR", "MLP", PolarConfig, {"target_modules": ["lin0"], "r": 4, "alpha": 4, "dropout": 0.1}),
    ("Vanilla MLP 7 PoLAR", "MLP", PolarConfig, {"target_modules": r"lin\d", "r": 2, "alpha": 2}),
    # Θ as a vector of r values.
    ("Vanilla MLP 8 PoLAR", "MLP", PolarConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "alpha": 2, "theta": "diagonal"}),
    # Per-module rank and alpha.
    (
        "Vanilla MLP 9 PoLAR",
        "MLP",
        PolarConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "alpha": 2, "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 8}},
    ),
    # transformers' Conv1D stores its weight as (in, out): fan_in_fan_out is set from the layer type.
    ("Embedding + transformers Conv1D 1 PoLAR", "EmbConv1D", PolarConfig, {"target_modules": ["conv1d"], "r": 1}),
    (
        "Embedding + transformers Conv1D 2 PoLAR",
        "EmbConv1D",
        PolarConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 2, "rank_pattern": {"conv1d": 1}},
    ),
]

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "PoLAR Same",
        "polar",
        PolarConfig,
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
    ),
    (
        "PoLAR Different",
        "polar",
        PolarConfig,
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
        {"target_modules": ["lin1"], "r": 2, "init_weights": False},
    ),
]

MIXED_ADAPTER_TEST_CASES = [
    (
        "PoLAR mixed adapter",
        PolarConfig(target_modules=["lin0"], r=4, init_weights=False),
        PolarConfig(target_modules=["lin0"], r=8, init_weights=False),
    ),
]
