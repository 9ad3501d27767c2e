"""Evaluation with test-time training: mean loss, per-token NLL by position, and what a
curve drawn from them can carry.

Every statistic is over held-out *sequences*, the unit that is sampled: a position's or a
bin's NLL is a ratio (summed NLL over counted targets) per sequence, and its standard
error is the ratio estimator's over the sequences evaluated (tokens of one sequence are
not independent draws).

- `bins`: the per-position NLL averaged in log-spaced bins of positions (`log_bin`: four
  per octave), each with its standard error: what the token-index figures draw.
- `context_use`: mean NLL at context lengths (window/2, window] minus the mean at
  (max(T/2, window), T], per sequence, with its standard error: how much the loss still
  falls well beyond the attention window. About zero for a model that uses nothing but
  the last few tokens; `model.window` marks the same positions for every mixer, so runs
  of one study compare.
- `recall` (the recall task): exact-match accuracy and NLL of the queries' answers by
  log2 bucket of the distance to their definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
from jax.experimental import multihost_utils

from ttt.rundir import companion
from ttt.stats import context_spans, log_bin, ratio_mean_se


@dataclass
class EvalResult:
    loss: float  # masked mean token NLL over every evaluated token
    nll_by_position: np.ndarray  # (T,), averaged over sequences where the mask is set
    count_by_position: np.ndarray
    sequences: int
    seq_len: int
    # more metrics of the same evaluation (`train.telemetry`: what the inner steps bought)
    extra: dict = field(default_factory=dict)
    loss_se: float = math.nan
    bins: dict = field(default_factory=dict)  # column -> array, one row per log bin
    context_use: float = math.nan
    context_use_se: float = math.nan
    recall: dict = field(default_factory=dict)  # column -> array, one row per bucket

    @property
    def metrics(self) -> dict:
        out = {"eval_loss": self.loss, "eval_loss_se": self.loss_se}
        if math.isfinite(self.context_use):
            out |= {"context_use": self.context_use, "context_use_se": self.context_use_se}
        return {**out, **recall_metrics(self.recall), **self.extra}

    def write_parquet(self, path: Path) -> Path:
        """The per-position table at `path`, and beside it (`companion`) the bins and,
        for the recall task, the accuracy by distance."""

        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(
            {
                "position": np.arange(self.seq_len, dtype=np.int64),
                "nll": self.nll_by_position.astype(np.float64),
                "count": self.count_by_position.astype(np.int64),
            }
        ).write_parquet(path)
        if self.bins:
            pl.DataFrame(self.bins).write_parquet(companion(path, "bins"))
        if self.recall:
            pl.DataFrame(self.recall).write_parquet(companion(path, "recall"))
        return path


def recall_metrics(recall: dict) -> dict[str, float]:
    """The recall table as metrics: overall accuracy and answer NLL, and the accuracy of
    each distance bucket (`recall_accuracy_d8`: distances 8..15)."""
    if not recall:
        return {}
    hits, queries = np.asarray(recall["hits"]), np.asarray(recall["queries"])
    nll = np.asarray(recall["nll_sum"])
    out = {
        "recall_accuracy": float(hits.sum() / max(queries.sum(), 1)),
        "recall_nll": float(nll.sum() / max(queries.sum(), 1)),
    }
    for lo, acc in zip(recall["distance_lo"], recall["accuracy"], strict=True):
        out[f"recall_accuracy_d{int(lo)}"] = float(acc)
    return out


class _Accumulator:
    """Per-sequence sums of one evaluation, kept until the end (sequences x bins)."""

    def __init__(self, seq_len: int, window: int | None):
        self.seq_len = seq_len
        self.bin_of = log_bin(np.arange(seq_len))
        # bins are runs of consecutive positions, some empty (four per octave, from 1)
        self.present = np.unique(self.bin_of)
        self.starts = np.searchsorted(self.bin_of, self.present)
        self.spans = context_spans(seq_len, window) if window else None
        self.parts: dict[str, list[np.ndarray]] = {}

    def _add(self, key: str, value: np.ndarray) -> None:
        self.parts.setdefault(key, []).append(value)

    def add(self, nll: np.ndarray, mask: np.ndarray, hit=None, distance=None) -> None:
        weighted = nll * mask
        self._add("bin_sum", np.add.reduceat(weighted, self.starts, axis=1))
        self._add("bin_count", np.add.reduceat(mask.astype(np.float64), self.starts, axis=1))
        if self.spans is not None:
            context = np.arange(1, self.seq_len + 1)
            for name, (lo, hi) in zip(("near", "far"), self.spans, strict=True):
                inside = (context >= lo) & (context <= hi)
                self._add(f"{name}_sum", weighted[:, inside].sum(1))
                self._add(f"{name}_count", mask[:, inside].sum(1).astype(np.float64))
        if distance is not None:
            self._recall(nll, hit, distance)

    def _recall(self, nll, hit, distance) -> None:
        query = distance > 0
        bucket = np.where(query, np.floor(np.log2(np.maximum(distance, 1))), -1).astype(int)
        buckets = int(np.log2(max(self.seq_len, 2))) + 1
        for key, value in (("hit", hit), ("nll", nll), ("query", np.ones_like(nll))):
            per = np.stack([(value * (bucket == b)).sum(1) for b in range(buckets)], 1)
            self._add(f"recall_{key}", per.astype(np.float64))

    def stacked(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key])

    def bins(self) -> dict:
        sums, counts = self.stacked("bin_sum"), self.stacked("bin_count")
        rows = [ratio_mean_se(sums[:, j], counts[:, j]) for j in range(len(self.present))]
        ends = np.append(self.starts[1:], self.seq_len) - 1
        return {
            "bin": self.present.astype(np.int64),
            "first_position": self.starts.astype(np.int64),
            "last_position": ends.astype(np.int64),
            "nll": np.array([m for m, _ in rows]),
            "se": np.array([s for _, s in rows]),
            "sequences": (counts > 0).sum(0).astype(np.int64),
        }

    def context_use(self) -> tuple[float, float]:
        if self.spans is None:
            return math.nan, math.nan
        near_s, near_c = self.stacked("near_sum"), self.stacked("near_count")
        far_s, far_c = self.stacked("far_sum"), self.stacked("far_count")
        both = (near_c > 0) & (far_c > 0)
        diff = near_s[both] / near_c[both] - far_s[both] / far_c[both]
        if diff.size == 0:
            return math.nan, math.nan
        se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else math.nan
        return float(diff.mean()), se

    def recall(self) -> dict:
        if "recall_query" not in self.parts:
            return {}
        hits, nll = self.stacked("recall_hit"), self.stacked("recall_nll")
        queries = self.stacked("recall_query")
        used = [b for b in range(queries.shape[1]) if queries[:, b].sum() > 0]
        acc = [ratio_mean_se(hits[:, b], queries[:, b]) for b in used]
        return {
            "distance_lo": np.array([2**b for b in used], np.int64),
            "distance_hi": np.array([2 ** (b + 1) - 1 for b in used], np.int64),
            "queries": np.array([queries[:, b].sum() for b in used], np.int64),
            "hits": np.array([hits[:, b].sum() for b in used], np.int64),
            "accuracy": np.array([a for a, _ in acc]),
            "accuracy_se": np.array([s for _, s in acc]),
            "nll_sum": np.array([nll[:, b].sum() for b in used]),
            "nll": np.array([nll[:, b].sum() / queries[:, b].sum() for b in used]),
        }


def evaluate(eval_step, params, loader, max_batches: int, eta: float, put,
             window: int | None = None) -> EvalResult:  # fmt: skip
    """Run `max_batches` batches from the loader's start (the val split, in order; 0: all
    of it). `window` marks the spans of `context_use`. A loader that knows its queries'
    distances (the recall task) gets them scored, from an `eval_step` made with `hits`."""
    total = np.zeros(loader.seq_len)
    count = np.zeros(loader.seq_len)
    sequences = 0
    per_seq_sum, per_seq_count = [], []
    acc = _Accumulator(loader.seq_len, window)
    available = max(loader.num_samples // loader.batch_size, 1)
    batches = min(max_batches, available) if max_batches else available
    distances = getattr(loader, "distances_at", None)
    for i in range(batches):
        inputs, targets, mask = loader.batch_at(i * loader.batch_size)
        out = eval_step(params, put((inputs, targets, mask)), jnp.float32(eta))
        nll, hit = out[0], (out[2] if len(out) > 2 else None)
        nll = np.asarray(_gather(nll), np.float64)
        hit = None if hit is None else np.asarray(_gather(hit), np.float64)
        total += (nll * mask).sum(0)
        count += mask.sum(0)
        per_seq_sum.append((nll * mask).sum(1))
        per_seq_count.append(mask.sum(1))
        scored = distances is not None and hit is not None  # the recall task, with hits
        acc.add(nll, mask, hit, distances(i * loader.batch_size) if scored else None)
        sequences += len(inputs)
    by_pos = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
    loss, loss_se = ratio_mean_se(np.concatenate(per_seq_sum), np.concatenate(per_seq_count))
    if not math.isfinite(loss):
        loss = 0.0  # nothing counted (every target BOS): as before, a loss of zero
    use, use_se = acc.context_use()
    return EvalResult(loss, by_pos, count, sequences, loader.seq_len, loss_se=loss_se,
                      bins=acc.bins(), context_use=use, context_use_se=use_se,
                      recall=acc.recall())  # fmt: skip


def _gather(x):
    if jax.process_count() > 1:  # rows live on other processes' devices
        x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
