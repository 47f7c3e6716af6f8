"""The optimiser's defaults as plain data, shared by the adapter config, the optimiser and ``polar train``.

A leaf module (no imports, no torch): :class:`polar.PolarConfig` stores the mode and λ that
:func:`polar.make_optimizer` uses for an adapter, :mod:`polar.optim.modes` defines the modes themselves, and
:mod:`polar.training.settings` builds ``polar train``'s flags and checks their values without loading the optimiser.
All read the defaults from here so that the tuner never imports the optimiser (loading an adapter for inference does
not pull it in), the command line parses without torch, and the defaults have one definition. BENCHMARKS.md,
"Keeping the factors on the manifold", has the runs behind them; the paper's setting is ``mode="landing"`` with
λ = 5e-3.
"""

DEFAULT_MODE = "riemannian"
DEFAULT_LAMBDA = 5e-3  # the reference's λ, for the modes that use one
DEFAULT_RETRACTION = "polar"  # the retraction of the riemannian / retraction modes

# The names `polar train` offers for --optimizer-mode and --retraction, known before the optimiser (and torch) is
# imported so that parsing and --help stay fast. The registries they name are polar.optim.modes.MODES (the
# penalty / euclidean ablations included) and polar.optim.stiefel.RETRACTIONS; tests/test_layering.py checks that
# these tuples list exactly their keys.
MODE_NAMES = ("riemannian", "landing", "retraction", "penalty", "euclidean")
RETRACTION_NAMES = ("polar", "qr", "newton_schulz")

# What a step that meets NaN/inf gradients does: skip it (nothing changes) or raise.
NONFINITE_POLICIES = ("skip", "raise")
#: Consecutive skipped steps allowed before a step with non-finite values raises (``polar train`` flag
#: ``--max-consecutive-skipped-steps``): an isolated overflow is skipped, a run that produces nothing but NaNs
#: stops instead of spinning.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10


def validate_nonfinite(nonfinite: str, max_consecutive_skips: int | None, who: str = "LandingAdamW",
                       spelling: dict[str, str] | None = None) -> None:
    """Refuse an unknown policy or a limit that is not an integer ≥ 0 (``None``: no limit)."""
    say = {"nonfinite": "nonfinite", "max_consecutive_skips": "max_consecutive_skips", **(spelling or {})}
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{who}: {say['nonfinite']}={nonfinite!r} is not a policy; valid: "
                         f"{', '.join(map(repr, NONFINITE_POLICIES))} (skip the step with a warning, or raise)")
    m = max_consecutive_skips
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
        raise ValueError(f"{who}: {say['max_consecutive_skips']} must be an integer ≥ 0 (0: stop at the first step "
                         f"with non-finite values), got {m!r}")
