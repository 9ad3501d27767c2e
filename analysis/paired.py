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

from ttt.config import ONLY_FOR, applies

PAIR_BY = "train.seed"
LEVEL = 0.95
RESAMPLES = 4000


def bootstrap_interval(deltas, se=None, level: float = LEVEL, n: int = RESAMPLES, seed: int = 0):
    """The percentile interval of the mean of `deltas` over resamples of the pairs (with
    replacement). `se`: each pair's standard error from the evaluations themselves; a
    resampled pair is then also drawn from N(delta, se^2), so the interval holds the
    evaluation's sampling error as well as the seed's. Identical pairs with no such error
    give a zero-width interval; one pair gives none (NaN): one seed has no spread to
    show."""
    d = np.asarray(deltas, np.float64)
    if d.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, (n, d.size))
    draws = d[idx]
    if se is not None:
        err = np.nan_to_num(np.asarray(se, np.float64), nan=0.0)
        draws = draws + rng.standard_normal(draws.shape) * err[idx]
    means = draws.mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def seed_spread(pairs: pl.DataFrame, by: list[str], delta: str = "delta") -> float | None:
    """The store's own threshold: how far one comparison (a method against its baseline
    at the same `by` values) moved when only the seed changed, the largest such spread of
    the paired differences `delta` in the store. None where no comparison has two seeds."""
    lines = ["method", "line"] if "line" in pairs.columns else ["method"]
    spread = (
        pairs.group_by([*lines, *by])
        .agg((pl.col(delta).max() - pl.col(delta).min()).alias("s"), pl.len().alias("n"))
        .filter(pl.col("n") > 1)
    )
    return None if spread.is_empty() else float(spread["s"].max())


def _shared_knobs(frame: pl.DataFrame, method: str, baseline: str) -> list[str]:
    """The knobs of some mixers only (`ttt.config.ONLY_FOR`) that act on both methods'
    runs, among the frame's columns."""
    if "model.mixer" not in frame.columns:
        return []
    mixers = {}
    for m in (method, baseline):
        found = frame.filter(pl.col("method") == m)["model.mixer"]
        mixers[m] = found[0] if found.len() else None
    return [
        k
        for k in ONLY_FOR
        if k in frame.columns and k != "ttt.meta"
        and all(mx is not None and applies(k, mx) for mx in mixers.values())
    ]  # fmt: skip


def paired_delta(
    frame: pl.DataFrame, baseline: str, on: list[str], value: str, se: str | None = None
) -> pl.DataFrame:
    """Per method other than `baseline` (and per `line` of it, where the frame has
    lines: `analysis.recipes.with_line`) and per `on` values: the mean over seeds of
    (run - its baseline twin), its bootstrap interval (`delta_lo`, `delta_hi`; none for a
    single pair), the number of pairs, and `noise`: whether the interval holds zero or the
    difference is within the store's seed spread (null where one pair cannot tell). `se`:
    the column of each run's evaluation standard error; a pair's is taken as
    sqrt(se_run^2 + se_twin^2), an upper bound since both read the same held-out
    sequences. Runs without a twin are left out."""
    se = se if se is not None and se in frame.columns else None
    err = pl.col(se).cast(pl.Float64) if se else pl.lit(0.0)
    base_rows = frame.filter(pl.col("method") == baseline)
    parts = []
    for (method,), runs in frame.filter(pl.col("method") != baseline).group_by("method"):
        # twins also share every knob that acts on both methods (the window of a TTT-E2E
        # run and of its SWA twin; window, chunk and inner LR with meta-learning off)
        keys = [*on, *_shared_knobs(frame, method, baseline)]
        keys += [PAIR_BY] if PAIR_BY in frame.columns else []
        base = base_rows.select(*keys, pl.col(value).alias("_b"), err.alias("_bse"))
        # one baseline run per key (a resumed duplicate would otherwise pair twice)
        base = base.group_by(keys).agg(pl.col("_b").mean(), pl.col("_bse").mean())
        parts.append(runs.with_columns(err.alias("_se")).join(base, on=keys, how="inner"))
    pairs = (
        pl.concat(parts, how="diagonal_relaxed") if parts else frame.clear().with_columns(
            pl.lit(0.0).alias("_b"), pl.lit(0.0).alias("_se"), pl.lit(0.0).alias("_bse"))
    ).with_columns(
        (pl.col(value) - pl.col("_b")).alias("_d"),
        (pl.col("_se") ** 2 + pl.col("_bse") ** 2).sqrt().alias("_dse"),
    )  # fmt: skip
    lines = ["method", "line"] if "line" in frame.columns else ["method"]
    spread = seed_spread(pairs, on, "_d")
    rows = []
    for key, g in pairs.group_by([*lines, *on], maintain_order=True):
        d = g["_d"].to_numpy()
        lo, hi = bootstrap_interval(d, g["_dse"].to_numpy() if se else None)
        mean = float(d.mean())
        noise = None
        if len(d) > 1:
            noise = bool(lo <= 0 <= hi) or (spread is not None and abs(mean) <= spread)
        rows.append(dict(zip([*lines, *on], key, strict=True)) | {
            "delta": mean, "delta_lo": lo, "delta_hi": hi, "pairs": len(d), "noise": noise,
        })  # fmt: skip
    schema = {c: frame.schema[c] for c in [*lines, *on]}
    schema |= {"delta": pl.Float64, "delta_lo": pl.Float64, "delta_hi": pl.Float64}
    schema |= {"pairs": pl.Int64, "noise": pl.Boolean}
    out = pl.DataFrame(rows, schema=schema, orient="row")
    return out.with_columns(pl.lit(spread, pl.Float64).alias("seed_spread"))
