"""What each inner step bought, measured over evaluation batches (`ttt.model.telemetry`):
one row per (chunk, TTT layer), averaged over the sequences. Training (`train.telemetry`)
and `ttt eval --telemetry` both take it from here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import polars as pl
from flax import nnx

from ttt.model.kernels import resolve
from ttt.model.telemetry import LOSSES, PER_LAYER, inner_telemetry


def telemetry_step(cfg, graphdef):
    """The jitted telemetry of one batch (`ttt.model.telemetry.inner_telemetry`)."""
    kernels = resolve(cfg, first_order=True)

    @jax.jit
    def measure(params, batch):
        inputs, targets, mask = batch
        model = nnx.merge(graphdef, params)
        eta = jnp.float32(cfg.ttt.inner_lr)
        return inner_telemetry(model, inputs, targets, mask, eta, cfg.ttt, kernels)

    return measure


def telemetry_table(cfg, measure, params, val, max_batches: int, put) -> pl.DataFrame:
    """Each inner step over the first `max_batches` validation batches (0: all of them),
    averaged over the sequences: one row per (chunk, TTT layer)."""
    available = max(val.num_samples // val.batch_size, 1)
    batches = min(max_batches, available) if max_batches else available
    parts = []
    for i in range(batches):
        inputs, targets, mask = val.batch_at(i * val.batch_size)
        out = jax.device_get(measure(params, put((inputs, targets, mask))))
        parts.append({k: np.asarray(v, np.float64) for k, v in out.items()})
    stats = {k: np.concatenate([p[k] for p in parts]).mean(0) for k in parts[0]}
    chunks, layers = stats["grad_norm"].shape
    return pl.DataFrame(
        {
            "chunk": np.repeat(np.arange(chunks), layers),
            "layer": np.tile(np.arange(cfg.model.layers - layers, cfg.model.layers), chunks),
            **{k: np.repeat(stats[k], layers) for k in LOSSES},
            **{k: stats[k].reshape(-1) for k in PER_LAYER},
        }
    ).with_columns(seq_len=pl.lit(cfg.data.seq_len))


def telemetry_summary(table) -> dict[str, float]:
    """What the inner steps bought, as metrics: nats on their own chunk and on the next
    (mean over chunks; the last chunk has no next) and the mean relative update."""
    chunks = table.filter(table["layer"] == table["layer"].min())  # losses: one row a chunk
    return {
        "inner_gain_own": float(np.nanmean(chunks["loss_before"] - chunks["loss_after"])),
        "inner_gain_next": float(np.nanmean(chunks["next_before"] - chunks["next_after"])),
        "inner_update_rel": float(np.nanmean(table["update_rel"])),
    }
