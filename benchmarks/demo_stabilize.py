"""stabilize_every at demo scale (BENCHMARKS.md, "Demo scale"): the generated task of ``polar demo``, PoLAR r = 16,
120 steps, lr 4e-3, with the paper's landing field (λ = 5e-3) with and without ``stabilize_every=10``, and the
default (riemannian) optimiser. Each run is ``polar.train`` + ``polar.evaluate``; one JSON line per run on stdout.

    .venv/bin/python benchmarks/demo_stabilize.py runs/demo_stabilize
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = {
    "landing": {"optimizer_mode": "landing", "landing_lambda": 5e-3},
    "landing-stabilize10": {"optimizer_mode": "landing", "landing_lambda": 5e-3, "stabilize_every": 10},
    "riemannian": {"optimizer_mode": "riemannian"},
}


def main(argv: list[str]) -> int:
    import polar
    from polar.demo import DemoSettings, minilm_path
    from polar.demo_task import write_demo_task

    out = Path(argv[0] if argv else "runs/demo_stabilize")
    s = DemoSettings(out_dir=str(out))
    data = write_demo_task(out / "data", n_train=s.n_train, n_dev=s.n_dev, seed=s.seed)
    for name, options in RUNS.items():
        run_dir = out / name
        summary = polar.train(
            model=str(minilm_path()), task="glue:sst2", data_dir=str(data), adapter="polar", output_dir=str(run_dir),
            overwrite=True, r=s.r, alpha=float(2 * s.r), target_modules=list(s.target_modules),
            learning_rate=s.polar_lr, max_steps=s.steps, batch_size=s.batch_size, cutoff=s.cutoff, warmup=0.06,
            scheduler="linear", seed=s.seed, logging_steps=max(1, s.steps // 15), save_steps=10**9, **options,
        )
        accuracy = polar.evaluate(run_dir)["results"]["glue:sst2"]["accuracy"]
        run = summary["run"]
        print(json.dumps({"run": name, "accuracy": accuracy, "peak_orth_error": run.get("peak_orth_error"),
                          "final_orth_error": run.get("final_orth_error")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
