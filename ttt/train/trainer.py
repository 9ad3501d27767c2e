"""`ttt.train.run`: one training run, the unit a sweep trial calls in-process.

A run directory holds `config.yaml`, `run.json` (data fingerprint, status),
`metrics.jsonl`, `checkpoints/` (Orbax) and `eval/`. Calling `run` again on the same
directory with the same config resumes from the latest checkpoint, exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from ttt import compile_cache
from ttt.config import Config, load_config
from ttt.data.loader import Loader, open_split
from ttt.errors import UserError
from ttt.model import create_model
from ttt.train.checkpoint import Checkpoints, load_params
from ttt.train.evaluate import EvalResult, evaluate
from ttt.train.flops import flops_per_token, peak_flops
from ttt.train.optim import hyper
from ttt.train.step import (
    batch_putter,
    data_mesh,
    init_opt_state,
    make_eval_step,
    make_train_step,
    replicated,
    uses_inner_loop,
)


class Reporter:
    """Hooks a caller (a sweep trial) gets; every method is optional."""

    def metrics(self, step: int, values: dict) -> None: ...

    def checkpoint(self, step: int, directory: Path, values: dict, final: bool = False) -> None:
        """A checkpoint was written; `values` are that step's metrics (with `eval_loss` and
        `final=True` at the end). Steps that are checkpointed get this call instead of
        `metrics`, so a caller reports each step once."""

    def evaluation(self, step: int, result: EvalResult) -> None: ...


@dataclass
class RunResult:
    status: str  # finished | diverged | stopped
    step: int
    out_dir: Path
    loss: float | None = None
    eval_loss: float | None = None
    message: str = ""
    metrics: dict = field(default_factory=dict)


def _check_vocab(cfg: Config, bos_id: int, path: Path) -> None:
    if bos_id >= cfg.model.vocab_size:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size}: smaller than the BOS id {bos_id} of "
            f"{path}; set model.vocab_size to the dataset's vocabulary"
        )


def max_loss(cfg: Config) -> float:
    return cfg.train.max_loss or 3 * math.log(cfg.model.vocab_size)


def _check_run_dir(out: Path, cfg: Config) -> None:
    """The same config resumes; a larger train.steps extends a run (Levanter's way);
    anything else needs a new --out."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    old = load_config(yaml.safe_load(saved.read_text())).flat()
    diff = [k for k, v in cfg.flat().items() if old.get(k) != v and k != "train.steps"]
    if cfg.train.steps < old["train.steps"]:
        diff.insert(0, "train.steps")
    if diff:
        k = diff[0]
        raise UserError(
            f"--out={str(out)!r} holds a run with another config ({k}: {old.get(k)!r} there, "
            f"{cfg.flat()[k]!r} here); choose a new --out to start a new run"
            + (" (train.steps may only grow)" if k == "train.steps" else "")
        )


class _Log:
    def __init__(self, path: Path, keep_until: int, enabled: bool = True):
        self.file = None
        if not enabled:
            return
        # On resume, drop lines past the checkpoint so each step is recorded once.
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= keep_until]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _initial_state(cfg: Config, ckpt: Checkpoints | None, params, opt_state):
    """(params, opt_state, step, data position) to start from: the run's latest checkpoint,
    else the weights of `train.init_from`, else the fresh init. In a multi-process run
    process 0 reads the files and every other process receives the values from it."""
    start, position = 0, 0
    if ckpt is not None:
        start = ckpt.latest_step() or 0
        if start:
            params, opt_state, meta = ckpt.restore(start, params, opt_state)
            position = int(meta["position"])
        elif cfg.train.init_from:
            params, _ = load_params(cfg.train.init_from, params)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        state = (params, opt_state, np.int64(start), np.int64(position))
        params, opt_state, start, position = multihost_utils.broadcast_one_to_all(state)
    return params, opt_state, int(start), int(position)


def run(
    cfg: Config,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    *,
    devices=None,
    stop_at: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Train (or resume) to `train.steps`, evaluating and checkpointing on the way.

    `stop_at` ends early after that step with a checkpoint (status `stopped`), as a
    killed run would have; running again continues exactly.
    """
    from tqdm import tqdm

    reporter = reporter or Reporter()
    compile_cache.enable()
    out = Path(out_dir)
    tr = cfg.train
    mesh = data_mesh(devices)
    n_dev = mesh.devices.size
    if cfg.data.batch_size % (n_dev * tr.grad_accum):
        raise UserError(
            f"data.batch_size={cfg.data.batch_size}: must be a multiple of "
            f"{n_dev} devices x train.grad_accum={tr.grad_accum}"
        )
    train_split = open_split(cfg.data.source, "train", cfg.data.cache_dir)
    val_split = open_split(cfg.data.source, "val", cfg.data.cache_dir)
    _check_vocab(cfg, train_split.bos_id, train_split.path)
    loader = Loader(train_split, cfg.data.seq_len, cfg.data.batch_size, seed=tr.seed)
    val = Loader(val_split, cfg.data.seq_len, cfg.data.batch_size, shuffle=False)

    _check_run_dir(out, cfg)
    # In a multi-process run every process trains; process 0 alone writes files and reports.
    lead = jax.process_index() == 0
    if not lead:
        reporter = Reporter()
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    graphdef, params = nnx.split(create_model(cfg.model, seed=tr.seed))
    opt_state = init_opt_state(cfg, params)
    # Process 0 alone keeps checkpoints: its run dir is the one the sweep persists, and
    # the other processes' nodes need no shared filesystem.
    ckpt = Checkpoints(out, keep=tr.keep_checkpoints) if lead else None
    try:
        params, opt_state, start, loader.position = _initial_state(cfg, ckpt, params, opt_state)
    except BaseException:
        # A start that fails (a bad train.init_from) leaves nothing that blocks a re-run.
        if ckpt is not None:
            ckpt.close()
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if lead:  # written once the start state is known good: it pins the run's config
        (out / "config.yaml").write_text(cfg.to_yaml())
    params = jax.device_put(params, replicated(mesh))
    opt_state = jax.device_put(opt_state, replicated(mesh))
    put = batch_putter(mesh)

    previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    run_info = {
        "status": "running",
        "step": start,
        "data_fingerprint": train_split.fingerprint,
        "bos_id": train_split.bos_id,
        "devices": n_dev,
        "device_kind": mesh.devices.flat[0].device_kind,
    }
    if lead:
        (out / "run.json").write_text(json.dumps(run_info, indent=2))
    log = _Log(out / "metrics.jsonl", start, enabled=lead)
    train_step = compile_cache.CachedStep("train", cfg, make_train_step(cfg, graphdef))
    eval_step = compile_cache.CachedStep("eval", cfg, make_eval_step(cfg, graphdef))
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg, training=True, inner=uses_inner_loop(cfg, True))
    peak = peak_flops(run_info["device_kind"], tr.peak_flops)
    last = stop_at if stop_at is not None else tr.steps
    last = min(last, tr.steps)
    limit = max_loss(cfg)

    def do_eval(step: int) -> EvalResult:
        result = evaluate(eval_step, params, val, tr.eval_batches, cfg.ttt.inner_lr, put)
        log.write({"step": step, "eval_loss": result.loss})
        if lead:
            result.write_parquet(out / "eval" / "nll_by_position.parquet")
        reporter.evaluation(step, result)
        return result

    def save(step: int, values: dict, final: bool = False) -> None:
        if ckpt is None:
            return
        directory = ckpt.save(step, params, opt_state, {"step": step, "position": loader.position})
        reporter.checkpoint(step, directory, values, final)

    result = RunResult("finished", start, out)
    bar = tqdm(
        total=tr.steps,
        initial=start,
        disable=not progress,
        desc=out.name,
        unit="step",
        dynamic_ncols=True,
    )
    t_last = time.perf_counter()

    def record(s: int, m, report: bool = True) -> bool:
        """Log step s; False when its loss is not finite."""
        nonlocal t_last
        values = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(values["loss"]) or values["loss"] > limit:
            result.status, result.step = "diverged", s
            why = (
                ""
                if not math.isfinite(values["loss"])
                else (f" (loss {values['loss']:.4g} > train.max_loss={limit:.4g})")
            )
            result.message = f"diverged at step {s}{why}"
            return False
        now = time.perf_counter()
        values["tokens_per_s"] = tokens_per_step / max(now - t_last, 1e-9)
        values["flops_per_token"] = flops
        if peak:
            values["mfu"] = flops * values["tokens_per_s"] / (peak * n_dev)
        t_last = now
        result.loss, result.metrics = values["loss"], values
        if s % max(tr.log_every, 1) == 0 or s == last:
            log.write({"step": s, **values})
            if report:
                reporter.metrics(s, values)
        bar.update(s - bar.n)
        bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
        return True

    pending = []  # steps dispatched but not yet read back
    step = start
    with bar:
        for step in range(start + 1, last + 1):
            batch = put(next(loader))
            params, opt_state, m = train_step(params, opt_state, batch, hyper(cfg, step - 1))
            pending.append((step, m))
            evaluate_now = bool(tr.eval_every) and step % tr.eval_every == 0 and step < tr.steps
            save_now = bool(tr.checkpoint_every) and step % tr.checkpoint_every == 0
            sync = step == last or evaluate_now or save_now
            # Read the previous step's metrics while this one runs; all of them at a sync.
            while len(pending) > (0 if sync else 1):
                s, m = pending.pop(0)
                # a step that will be checkpointed is reported with its checkpoint
                if not record(s, m, report=not (s == step and (save_now or step == last))):
                    break
            if result.status == "diverged":
                break
            if evaluate_now:
                result.eval_loss = do_eval(step).loss
            if save_now and step < last:
                save(step, result.metrics)
    if result.status == "diverged":
        run_info.update(status="diverged", step=result.step, message=result.message)
    else:
        result.step = step
        if step < tr.steps:
            result.status, values = "stopped", result.metrics
        elif step == start and previous.get("status") == "finished":  # nothing left to do
            result.loss, result.eval_loss = previous.get("loss"), previous.get("eval_loss")
        else:
            result.eval_loss = do_eval(step).loss
            values = {**result.metrics, "eval_loss": result.eval_loss}
        if step > start:
            save(step, values, final=result.status == "finished")
        run_info.update(
            status=result.status, step=step, loss=result.loss, eval_loss=result.eval_loss
        )
    if ckpt is not None:
        ckpt.close()
    log.close()
    if lead:
        (out / "run.json").write_text(json.dumps(run_info, indent=2))
    return result
