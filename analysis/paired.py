"""Paired comparisons with uncertainty: each run against its baseline twin (same seed, so
the same initialisation draw and data order, same steps, same stage), the mean of the
per-pair differences, and a seed-bootstrap confidence interval for it.

With two seeds an interval is wide: it is meant to be. A difference whose interval holds
zero, or which is no larger than the store's own seed spread (`seed_spread`: how far any
one paired comparison moved when only the seed changed), is reported as within seed
noise rather than as an effect.
"""

from __future__ import annotations

import numpy as np
import polars as pl

PAIR_BY = "train.seed"
LEVEL = 0.95
RESAMPLES = 4000


def bootstrap_interval(deltas, level: float = LEVEL, n: int = RESAMPLES, seed: int = 0):
    """The percentile interval of the mean of `deltas` over resamples of the pairs (with
    replacement). Identical pairs give a zero-width interval; one pair gives its value."""
    d = np.asarray(deltas, np.float64)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n, d.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def seed_spread(pairs: pl.DataFrame, by: list[str], delta: str = "delta") -> float | None:
    """The store's own threshold: how far one comparison (a method against its baseline
    at the same `by` values) moved when only the seed changed, the largest such spread of
    the paired differences `delta` in the store. None where no comparison has two seeds."""
    spread = (
        pairs.group_by(["method", *by])
        .agg((pl.col(delta).max() - pl.col(delta).min()).alias("s"), pl.len().alias("n"))
        .filter(pl.col("n") > 1)
    )
    return None if spread.is_empty() else float(spread["s"].max())


def paired_delta(frame: pl.DataFrame, baseline: str, on: list[str], value: str) -> pl.DataFrame:
    """Per method other than `baseline` and per `on` values: the mean over seeds of
    (run - its baseline twin), its bootstrap interval (`delta_lo`, `delta_hi`), the number
    of pairs, and `noise`: whether the interval holds zero or the difference is within the
    store's seed spread. Runs without a twin are left out."""
    keys = [*on, PAIR_BY] if PAIR_BY in frame.columns else list(on)
    base = frame.filter(pl.col("method") == baseline).select(*keys, pl.col(value).alias("_b"))
    # one baseline run per key (a resumed duplicate would otherwise pair twice)
    base = base.group_by(keys).agg(pl.col("_b").mean())
    pairs = (
        frame.filter(pl.col("method") != baseline)
        .join(base, on=keys, how="inner")
        .with_columns((pl.col(value) - pl.col("_b")).alias("_d"))
    )
    spread = seed_spread(pairs, on, "_d")
    rows = []
    for key, g in pairs.group_by(["method", *on], maintain_order=True):
        d = g["_d"].to_numpy()
        lo, hi = bootstrap_interval(d)
        mean = float(d.mean())
        noise = bool(lo <= 0 <= hi) or (spread is not None and abs(mean) <= spread)
        rows.append(dict(zip(["method", *on], key, strict=True)) | {
            "delta": mean, "delta_lo": lo, "delta_hi": hi, "pairs": len(d), "noise": noise,
        })  # fmt: skip
    schema = {c: frame.schema[c] for c in ["method", *on]}
    schema |= {"delta": pl.Float64, "delta_lo": pl.Float64, "delta_hi": pl.Float64}
    schema |= {"pairs": pl.Int64, "noise": pl.Boolean}
    out = pl.DataFrame(rows, schema=schema, orient="row")
    return out.with_columns(pl.lit(spread, pl.Float64).alias("seed_spread"))
