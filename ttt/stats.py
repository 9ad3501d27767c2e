"""The statistics of an evaluation, over held-out sequences (the unit that is sampled):
log bins of position, ratio means with their standard errors, and the spans that
context use compares. NumPy only, so the analysis package reads the same definitions
without starting JAX."""

from __future__ import annotations

import math

import numpy as np

BINS_PER_OCTAVE = 4


def log_bin(position):
    """The log-spaced bin of 0-based positions: four per octave of (position + 1)."""
    return np.floor(np.log2(np.asarray(position) + 1) * BINS_PER_OCTAVE).astype(np.int64)


def ratio_mean_se(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Mean of a ratio sum(sums) / sum(counts) over sampled units (rows) and its standard
    error (the ratio estimator's linearisation); NaN where fewer than two units count."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    used = counts > 0
    n, total = int(used.sum()), counts.sum()
    if n == 0:
        return math.nan, math.nan
    mean = float(sums.sum() / total)
    if n < 2:
        return mean, math.nan
    resid = (sums[used] - mean * counts[used]) / counts[used].mean()
    return mean, float(np.sqrt(resid.var(ddof=1) / n))


def context_spans(seq_len: int, window: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(near, far) as inclusive ranges of context length: (window/2, window] and
    (max(T/2, window), T]. None when the sequence does not reach past the window."""
    far_from = max(seq_len // 2, window)
    if window < 2 or far_from >= seq_len:
        return None
    return (window // 2 + 1, window), (far_from + 1, seq_len)
