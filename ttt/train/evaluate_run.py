"""`ttt eval RUN_DIR`: reload a run's latest weights and evaluate, at a new T, or on
exactly the token ids of a file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt import compile_cache
from ttt.config import Config
from ttt.data.loader import Loader, TokenSplit, open_split
from ttt.errors import UserError
from ttt.model import create_model
from ttt.rundir import RunDir, require_bos
from ttt.train.checkpoint import load_params, read_run_info
from ttt.train.evaluate import EvalResult, evaluate
from ttt.train.step import batch_putter, data_mesh, make_eval_step, replicated

if TYPE_CHECKING:
    import polars as pl


@dataclass
class LoadedRun:
    cfg: Config
    graphdef: object
    params: object  # replicated over the data mesh
    step: int
    info: dict  # run.json of the run the weights come from


def run_config(run_dir: str | Path, overrides: dict | None = None, **what) -> Config:
    """A run's saved config with `overrides`. `what` names the flags behind the
    overrides in errors (`data.seq_len="--seq-len"`)."""
    return RunDir(run_dir).config(overrides, **what)


def load_weights(cfg: Config, weights_dir: str | Path, key: str = "RUN_DIR") -> LoadedRun:
    """The latest weights of `weights_dir` (a run of ours, trained or imported), shaped
    by `cfg`, and that run's run.json."""
    compile_cache.enable()
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
    params, step = load_params(weights_dir, params, key=key)
    info = read_run_info(weights_dir)
    params = jax.device_put(params, replicated(data_mesh()))
    return LoadedRun(cfg, graphdef, params, step, info)


def check_bos(run: LoadedRun, split: TokenSplit) -> None:
    """A dataset whose documents are separated by another BOS than the run's would mask
    the wrong targets."""
    require_bos(run.info.get("bos_id"), split.bos_id, f"data.source={run.cfg.data.source!r}")


def evaluate_weights(
    run: LoadedRun, out: Path, max_batches: int | None = None, inner: bool = True
) -> tuple[EvalResult, dict]:
    """Evaluate loaded weights on the validation split of `run.cfg`'s dataset; writes the
    per-position NLL to `out` (Parquet) and its summary beside it (JSON). `inner=False`
    skips the test-time updates."""
    cfg = run.cfg
    split = open_split(cfg.data.source, "val", cfg.data.cache_dir)
    vocab = cfg.model.vocab_size
    if (split.vocab_size not in (None, vocab)) or split.bos_id >= vocab:
        # `ttt eval` takes no overrides and the weights fix the vocabulary: name what can move.
        raise UserError(
            f"data.source={cfg.data.source!r}: its ids (vocabulary {split.vocab_size}, BOS "
            f"{split.bos_id}) do not fit the run's weights (vocabulary {vocab}); point "
            "data.source in the run's config.yaml at a dataset of the run's tokenizer, or "
            "evaluate token ids with --tokens FILE.npy"
        )
    check_bos(run, split)
    val = Loader(split, cfg.data.seq_len, cfg.data.batch_size, shuffle=False, name="--seq-len")
    name = "eval" if inner else "eval-noinner"
    result = evaluate(
        compile_cache.CachedStep(name, cfg, make_eval_step(cfg, run.graphdef, inner)),
        run.params,
        val,
        max_batches or cfg.train.eval_batches,
        cfg.ttt.inner_lr,
        batch_putter(data_mesh()),
    )
    result.write_parquet(out)
    summary = {
        "step": run.step,
        "seq_len": cfg.data.seq_len,
        "loss": result.loss,
        "sequences": result.sequences,
        "inner": inner,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return result, summary


def evaluate_run(
    run_dir: str | Path,
    seq_len: int | None = None,
    max_batches: int | None = None,
    batch_size: int | None = None,
    inner: bool = True,
) -> tuple[EvalResult, Path, dict]:
    """(result, per-position NLL Parquet, summary) of the run's latest weights on the
    validation split of its dataset; `inner=False`: with the test-time updates skipped
    (ttt_e2e runs only)."""
    overrides = {"data.seq_len": seq_len} if seq_len is not None else {}
    if batch_size is not None:  # evaluation takes no gradient to accumulate
        overrides.update({"data.batch_size": batch_size, "train.grad_accum": 1})
    flags = {"data.seq_len": "--seq-len", "data.batch_size": "--batch-size"}
    cfg = run_config(run_dir, overrides, **flags)
    if not inner and cfg.model.mixer != "ttt_e2e":
        raise UserError(
            f"--no-inner: {run_dir} is a {cfg.model.mixer} run; only ttt_e2e has test-time "
            "updates to skip"
        )
    run = load_weights(cfg, run_dir)
    path = RunDir(run_dir).nll_table(cfg.data.seq_len, inner)
    result, summary = evaluate_weights(run, path, max_batches, inner)
    return result, path, summary


def telemetry_step(cfg, graphdef):
    """The jitted telemetry of one batch (`ttt.model.telemetry.inner_telemetry`)."""
    from ttt.model.kernels import resolve
    from ttt.model.telemetry import inner_telemetry

    kernels = resolve(cfg, first_order=True)

    @jax.jit
    def measure(params, batch):
        inputs, targets, mask = batch
        model = nnx.merge(graphdef, params)
        eta = jnp.float32(cfg.ttt.inner_lr)
        return inner_telemetry(model, inputs, targets, mask, eta, cfg.ttt, kernels)

    return measure


def telemetry_table(cfg, measure, params, val: Loader, max_batches: int, put):
    """Each inner step over the first `max_batches` validation batches, averaged over the
    sequences: one row per (chunk, TTT layer)."""
    import polars as pl

    from ttt.model.telemetry import LOSSES, PER_LAYER

    batches = min(max_batches, max(val.num_samples // val.batch_size, 1))
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


def inner_telemetry_run(
    run_dir: str | Path,
    seq_len: int | None = None,
    max_batches: int | None = None,
    batch_size: int | None = None,
) -> tuple[Path, pl.DataFrame]:
    """`ttt eval --telemetry`: each inner step of a ttt_e2e run's latest weights over the
    validation batches evaluation reads (`ttt.model.telemetry`), averaged over the
    sequences: one row per (chunk, TTT layer). Written to RUN/eval/inner_loop_T*.parquet."""
    import polars as pl

    overrides = {"data.seq_len": seq_len} if seq_len is not None else {}
    if batch_size is not None:
        overrides.update({"data.batch_size": batch_size, "train.grad_accum": 1})
    cfg = run_config(run_dir, overrides, **{"data.seq_len": "--seq-len"})
    if cfg.model.mixer != "ttt_e2e":
        raise UserError(
            f"--telemetry: {run_dir} is a {cfg.model.mixer} run; only ttt_e2e has an inner loop"
        )
    run = load_weights(cfg, run_dir)
    split = open_split(cfg.data.source, "val", cfg.data.cache_dir)
    check_bos(run, split)
    val = Loader(split, cfg.data.seq_len, cfg.data.batch_size, shuffle=False, name="--seq-len")
    measure = telemetry_step(cfg, run.graphdef)
    batches = max_batches or cfg.train.eval_batches
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


def evaluate_tokens(run_dir: str | Path, tokens_path: str | Path, out: Path | None = None):
    """Evaluate exactly the given sequences: inputs `tokens[:, :-1]`, targets
    `tokens[:, 1:]`, a target equal to the run's BOS masked out as in training."""
    tokens = read_tokens(tokens_path)
    batch, seq_len = tokens.shape[0], tokens.shape[1] - 1
    overrides = {"data.seq_len": seq_len, "data.batch_size": batch, "train.grad_accum": 1}
    cfg = run_config(run_dir, overrides, **{"data.seq_len": f"--tokens ({seq_len} targets)"})
    run = load_weights(cfg, run_dir)
    vocab = run.cfg.model.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise UserError(
            f"--tokens={str(tokens_path)!r}: ids span {tokens.min()}..{tokens.max()}, "
            f"outside the model's vocabulary 0..{vocab - 1}"
        )
    bos = run.info.get("bos_id")
    if bos is None:
        bos = open_split(run.cfg.data.source, "val", run.cfg.data.cache_dir).bos_id
    tokens = tokens.astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = targets != bos
    step = make_eval_step(run.cfg, run.graphdef)
    put = batch_putter(data_mesh())
    nll, loss = step(run.params, put((inputs, targets, mask)), jnp.float32(run.cfg.ttt.inner_lr))
    nll = np.asarray(nll, np.float64)
    token_loss = float((nll * mask).sum() / max(mask.sum(), 1))
    result = TokensResult(float(loss), token_loss, nll, targets, mask)
    out = out or RunDir(run_dir).tokens_table(Path(tokens_path).stem)
    _write_tokens(result, out)
    return result, out


def _write_tokens(result: TokensResult, path: Path) -> None:
    import polars as pl

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
