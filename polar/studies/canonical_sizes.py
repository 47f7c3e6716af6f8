"""The sizes of the canonical low-rank problem (``polar canonical``): the full study's and the tiny ``--small`` one,
and the step-size grid every method is tuned on.

Plain data outside the :mod:`polar.studies.canonical` package (whose ``__init__`` loads torch), so that
``polar canonical --help`` shows them without importing torch; :mod:`polar.studies.canonical.study` uses the same
values.
"""

DEFAULT_STEP_GRID = (0.25, 0.5, 0.75, 1.0)
# the tiny size used by --small (tests, the demo): seconds on one core
SMALL = {"m": 20, "n": 16, "rank": 4, "target_rank": 2, "iters": 2000, "kappa": [1.0, 10.0], "seeds": 2}
DEFAULTS = {"m": 60, "n": 50, "rank": 8, "target_rank": 4, "iters": 20_000, "kappa": [1.0, 10.0, 100.0], "seeds": 3}
