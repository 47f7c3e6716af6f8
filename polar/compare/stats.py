"""The statistics of a paired comparison: exact McNemar p, and the stratified paired bootstrap.

Both sides answered the same questions. Per question q of task t, each side's correctness is averaged over its
runs (seeds: replicates of one setup), ā_q and b̄_q, and d_q = b̄_q − ā_q. A task's difference is the mean of d_q
over its questions; the pooled difference is the unweighted mean of the task differences (the "task average" of
a results table).

Bootstrap: each resample draws, within each task separately (stratified), n_t questions with replacement and
takes the mean of their d_q; the pooled resample is the mean of the task resamples of the same index. Drawing n_t
items with replacement and summing them is a multinomial draw of how often each distinct d value is taken, which is
how it is computed (exactly the same distribution, at the cost of the few distinct values). The interval is the
2.5th and 97.5th percentiles of the resampled differences (numpy's linear interpolation). Seeds are not resampled:
the interval covers which questions were asked, given these training runs.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: the binomial test of ``only_a`` successes in ``only_a + only_b`` discordant pairs
    at p = ½ (twice the smaller tail, at most 1; 1 when there is no discordant pair)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be ≥ 0, got {only_a}, {only_b}.")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def task_generator(seed: int, metric: str, task: str) -> np.random.Generator:
    """The random stream of one task's resamples: seeded by (seed, metric, task), so that a task's interval does
    not depend on which other tasks, metrics or runs are in the comparison."""
    return np.random.default_rng([seed, zlib.crc32(metric.encode()), zlib.crc32(task.encode())])


def resample_means(differences: Sequence[float], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` bootstrap means of ``differences`` (questions drawn with replacement, as many as there are)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot resample an empty task.")
    distinct, counts = np.unique(values, return_counts=True)
    draws = rng.multinomial(values.size, counts / values.size, size=resamples)
    return draws @ distinct / values.size


def percentile_interval(resampled: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)
