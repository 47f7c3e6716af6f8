"""The optimiser's defaults as plain data, shared by the adapter config and the optimiser.

A leaf module (no imports): :class:`polar.PolarConfig` stores the mode and λ that :func:`polar.make_optimizer`
uses for an adapter, and :mod:`polar.optim.modes` defines the modes themselves. Both read the defaults from here so
that the tuner never imports the optimiser (loading an adapter for inference does not pull it in) and the defaults
have one definition. BENCHMARKS.md, "Keeping the factors on the manifold", has the runs behind them; the paper's
setting is ``mode="landing"`` with λ = 5e-3.
"""

DEFAULT_MODE = "riemannian"
DEFAULT_LAMBDA = 5e-3  # the reference's λ, for the modes that use one
