"""`ttt eval RUN_DIR`: reload a run's latest weights and evaluate, possibly at a new T."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import yaml
from flax import nnx

from ttt import compile_cache
from ttt.config import load_config
from ttt.data.loader import Loader, open_split
from ttt.errors import UserError
from ttt.model import create_model
from ttt.train.checkpoint import load_params
from ttt.train.evaluate import EvalResult, evaluate
from ttt.train.step import batch_putter, data_mesh, make_eval_step, replicated


def evaluate_run(
    run_dir: str | Path, seq_len: int | None = None, max_batches: int | None = None
) -> tuple[EvalResult, Path]:
    compile_cache.enable()
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"RUN_DIR={str(run_dir)!r}: no config.yaml there (not a run directory)")
    overrides = [f"data.seq_len={seq_len}"] if seq_len is not None else []
    cfg = load_config(yaml.safe_load((run_dir / "config.yaml").read_text()), overrides)
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
    params, step = load_params(run_dir, params, key="RUN_DIR")
    mesh = data_mesh()
    params = jax.device_put(params, replicated(mesh))
    val = Loader(
        open_split(cfg.data.source, "val", cfg.data.cache_dir),
        cfg.data.seq_len,
        cfg.data.batch_size,
        shuffle=False,
        name="--seq-len",
    )
    put = batch_putter(mesh)
    result = evaluate(
        compile_cache.CachedStep("eval", cfg, make_eval_step(cfg, graphdef)),
        params,
        val,
        max_batches or cfg.train.eval_batches,
        cfg.ttt.inner_lr,
        put,
    )
    path = result.write_parquet(run_dir / "eval" / f"nll_by_position_T{cfg.data.seq_len}.parquet")
    summary = {
        "step": step,
        "seq_len": cfg.data.seq_len,
        "loss": result.loss,
        "sequences": result.sequences,
    }
    (path.with_suffix(".json")).write_text(json.dumps(summary, indent=2))
    return result, path
