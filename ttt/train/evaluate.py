"""Evaluation with test-time training: mean loss and per-token NLL by position."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ttt.data.loader import Loader


@dataclass
class EvalResult:
    loss: float  # masked mean token NLL over every evaluated token
    nll_by_position: np.ndarray  # (T,), averaged over sequences where the mask is set
    count_by_position: np.ndarray
    sequences: int
    seq_len: int
    # more metrics of the same evaluation (`train.telemetry`: what the inner steps bought)
    extra: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        return {"eval_loss": self.loss, **self.extra}

    def write_parquet(self, path: Path) -> Path:
        import polars as pl

        path.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(
            {
                "position": np.arange(self.seq_len, dtype=np.int64),
                "nll": self.nll_by_position.astype(np.float64),
                "count": self.count_by_position.astype(np.int64),
            }
        ).write_parquet(path)
        return path


def evaluate(eval_step, params, loader: Loader, max_batches: int, eta: float, put) -> EvalResult:
    """Run `max_batches` batches from the loader's start (the val split, in order)."""
    total = np.zeros(loader.seq_len)
    count = np.zeros(loader.seq_len)
    sequences = 0
    batches = min(max_batches, max(loader.num_samples // loader.batch_size, 1))
    for i in range(batches):
        inputs, targets, mask = loader.batch_at(i * loader.batch_size)
        nll, _ = eval_step(params, put((inputs, targets, mask)), jnp.float32(eta))
        if jax.process_count() > 1:  # rows live on other processes' devices
            from jax.experimental import multihost_utils

            nll = multihost_utils.process_allgather(nll, tiled=True)
        nll = np.asarray(jax.device_get(nll), np.float64)
        total += (nll * mask).sum(0)
        count += mask.sum(0)
        sequences += len(inputs)
    by_pos = np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
    loss = float(total.sum() / max(count.sum(), 1))
    return EvalResult(loss, by_pos, count, sequences, loader.seq_len)
