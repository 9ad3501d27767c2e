"""The measurements evaluation makes of loaded weights (`LoadedRun`), each writing its
tables into the run directory: the loss by position (with or without the test-time
updates; on the recall task, with accuracy by distance), the inner steps' telemetry,
and the NLL of given token ids."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import polars as pl

from ttt import compile_cache
from ttt.data.loader import Dataset
from ttt.errors import UserError
from ttt.evaluation.weights import LoadedRun, open_data
from ttt.rundir import RunDir
from ttt.train.evaluate import EvalResult, evaluate
from ttt.train.step import batch_putter, data_mesh, make_eval_step
from ttt.train.telemetry import telemetry_step, telemetry_table


def loss(run: LoadedRun, out: Path, max_batches: int | None = None, inner: bool = True):
    """The loss and per-position NLL of `run.cfg`'s validation split (with their standard
    errors, context use and, on the recall task, accuracy by distance), written to `out`
    (Parquet, its companions beside it) with a JSON summary. `inner=False` skips the
    test-time updates. Returns (result, summary)."""
    cfg = run.cfg
    data = open_data(run)
    val = data.loader("val", cfg.data.seq_len, cfg.data.batch_size, name="--seq-len")
    hits = data.recall is not None  # exact-match accuracy of the recall answers
    name = ("eval" if inner else "eval-noinner") + ("-hits" if hits else "")
    result = evaluate(
        compile_cache.CachedStep(name, cfg, make_eval_step(cfg, run.graphdef, inner, hits)),
        run.params,
        val,
        cfg.train.eval_batches if max_batches is None else max_batches,
        cfg.ttt.inner_lr,
        batch_putter(data_mesh()),
        window=cfg.model.window,
    )
    result.write_parquet(out)
    summary = {
        "step": run.step,
        "seq_len": cfg.data.seq_len,
        "loss": result.loss,
        "sequences": result.sequences,
        "inner": inner,
        **{k: v for k, v in result.metrics.items() if k != "eval_loss"},
    }
    out.with_suffix(".json").write_text(json.dumps(_json_safe(summary), indent=2))
    return result, summary


def _json_safe(values: dict) -> dict:
    """NaN (a standard error of one sequence) as null: JSON has no NaN."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()
    }


def telemetry(run: LoadedRun, run_dir: Path, max_batches: int | None = None):
    """Each inner step over the validation batches evaluation reads, averaged over the
    sequences: one row per (chunk, TTT layer), written to RUN/eval/inner_loop_T*.parquet.
    Returns (path, table)."""
    cfg = run.cfg
    val = open_data(run).loader("val", cfg.data.seq_len, cfg.data.batch_size, name="--seq-len")
    batches = cfg.train.eval_batches if max_batches is None else max_batches
    measure = telemetry_step(cfg, run.graphdef)
    table = telemetry_table(cfg, measure, run.params, val, batches, batch_putter(data_mesh()))
    table = table.with_columns(step=pl.lit(run.step))
    path = RunDir(run_dir).telemetry_table(cfg.data.seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(path)
    return path, table


@dataclass
class TokensResult:
    loss: float  # the training objective (for ttt_e2e: mean over sequences of chunk means)
    token_loss: float  # masked mean NLL over every counted target
    nll: np.ndarray  # (B, T)
    targets: np.ndarray  # (B, T)
    counted: np.ndarray  # (B, T) bool: target is not the BOS


def load_ids(path: str | Path, flag: str = "--tokens") -> np.ndarray:
    """Integer token ids from a `.npy` array, or a `.npz` holding one array (or one named
    `tokens`, as the reference fixture's `expected.npz` does)."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{flag}={str(path)!r}: not a readable .npy/.npz array ({e})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = loaded.files
            if "tokens" in names:
                names = ["tokens"]
            if len(names) != 1:
                raise UserError(
                    f"{flag}={str(path)!r}: holds arrays {', '.join(loaded.files)}; expected "
                    "one, or one named tokens"
                )
            loaded = loaded[names[0]]
    if not np.issubdtype(loaded.dtype, np.integer):
        raise UserError(f"{flag}={str(path)!r}: dtype {loaded.dtype}; token ids are integers")
    return loaded


def read_tokens(path: str | Path) -> np.ndarray:
    """(B, T + 1) token ids from a file of one sequence or a 2-D batch (`load_ids`)."""
    tokens = load_ids(path)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(
            f"--tokens={str(path)!r}: shape {tokens.shape}; expected (T+1,) or (B, T+1), T >= 1"
        )
    return tokens


def tokens(run: LoadedRun, tokens: np.ndarray, source: Path, out: Path) -> TokensResult:
    """Exactly the given sequences: inputs `tokens[:, :-1]`, targets `tokens[:, 1:]`, a
    target equal to the run's BOS masked out as in training; the per-token NLL to `out`."""
    vocab = run.cfg.model.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise UserError(
            f"--tokens={str(source)!r}: ids span {tokens.min()}..{tokens.max()}, "
            f"outside the model's vocabulary 0..{vocab - 1}"
        )
    bos = run.info.get("bos_id")
    if bos is None:
        bos = Dataset(run.cfg, first="val").bos_id
    tokens = tokens.astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = targets != bos
    step = make_eval_step(run.cfg, run.graphdef)
    put = batch_putter(data_mesh())
    nll, loss_ = step(run.params, put((inputs, targets, mask)), jnp.float32(run.cfg.ttt.inner_lr))
    nll = np.asarray(nll, np.float64)
    token_loss = float((nll * mask).sum() / max(mask.sum(), 1))
    result = TokensResult(float(loss_), token_loss, nll, targets, mask)
    _write_tokens(result, out)
    return result


def _write_tokens(result: TokensResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    b, t = result.nll.shape
    pl.DataFrame(
        {
            "sequence": np.repeat(np.arange(b, dtype=np.int64), t),
            "position": np.tile(np.arange(t, dtype=np.int64), b),
            "token": result.targets.reshape(-1).astype(np.int64),
            "nll": result.nll.reshape(-1),
            "counted": result.counted.reshape(-1),
        }
    ).write_parquet(path)
    summary = {"loss": result.loss, "token_loss": result.token_loss, "sequences": b, "seq_len": t}
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2))


__all__ = ["EvalResult", "TokensResult", "load_ids", "loss", "read_tokens", "telemetry", "tokens"]
