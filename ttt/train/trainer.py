"""`ttt.train.run`: one training run, the unit a sweep trial calls in-process.

It writes a run directory (`ttt.rundir.RunDir`: config, run.json, metrics, Orbax
checkpoints, evaluations). Calling `run` again on the same directory with the same config
resumes from the latest checkpoint, exactly.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import polars as pl
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from ttt import compile_cache, process
from ttt.config import Config, load_config
from ttt.data.loader import Dataset
from ttt.errors import StorageError, UserError, writing
from ttt.model import create_model
from ttt.rundir import MANIFEST, RunDir
from ttt.train.checkpoint import Checkpoints, load_params, read_run_info
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
from ttt.train.telemetry import telemetry_step, telemetry_summary, telemetry_table


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
    status: str  # finished | diverged | stopped | interrupted
    step: int
    out_dir: Path
    loss: float | None = None
    eval_loss: float | None = None
    message: str = ""
    metrics: dict = field(default_factory=dict)
    signal: int | None = None  # the signal that interrupted the run


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT or SIGTERM asks the loop to stop after the step on the device: the run then
    checkpoints that step and records it in run.json, so the same command resumes. A
    second Ctrl-C stops at once (KeyboardInterrupt). Only the main thread can own signal
    handlers; elsewhere (a Ray trial's thread) the caller's own stop applies."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, frame):
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and checkpointing it "
            "(Ctrl-C again stops at once, without a checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    with process.signal_handlers({s: ask for s in _STOP_SIGNALS}):
        yield


def _check_init_bos(init_from: str, data: Dataset) -> None:
    """The run we start from was trained (or imported) with the same BOS id."""
    bos = read_run_info(init_from).get("bos_id")
    if bos is not None and bos != data.bos_id:
        raise UserError(
            f"train.init_from={init_from!r}: its BOS id is {bos}, the dataset {data.source} "
            f"uses {data.bos_id} (a dataset of another tokenizer)"
        )


def max_loss(cfg: Config) -> float:
    return cfg.train.max_loss or 3 * math.log(cfg.model.vocab_size)


def _check_run_dir(out: Path, cfg: Config) -> None:
    """The same config resumes; a larger train.steps extends a run (Levanter's way);
    anything else needs a new --out."""
    run = RunDir(out)
    if not run.is_run():
        return
    if read_run_info(out).get("status") == "imported":
        raise UserError(
            f"--out={str(out)!r} holds an imported checkpoint, which has no optimizer state to "
            f"resume; fine-tune it into a new run: train.init_from={out} --out NEW"
        )
    # Runs made before config.yaml stored absolute paths resume from their own folder.
    old = load_config(run.saved_config()).with_absolute_paths().flat()
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
        self.file, self.path = None, path
        if not enabled:
            return
        # On resume, drop lines past the checkpoint so each step is recorded once.
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= keep_until]
        with writing("metrics", path):
            path.write_text("".join(ln + "\n" for ln in kept))
            self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.file is not None:
            with writing("metrics", self.path):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the flush of a full disk: what was written is what is kept
                pass
            self.file = None


def initial_state(cfg: Config, ckpt: Checkpoints | None, params, opt_state):
    """(params, opt_state, step, data position) to start from: the run's latest checkpoint,
    else the weights of `train.init_from`, else the fresh init. In a multi-process run
    process 0 reads the files and every other process receives the values from it."""
    start, position = 0, 0
    if ckpt is not None:
        # the newest checkpoint that reads; one that does not is named and moved aside
        latest = ckpt.restore_latest(params, opt_state)
        if latest is not None:
            start, params, opt_state, meta = latest
            position = int(meta["position"])
        elif cfg.train.init_from:
            params, _ = load_params(cfg.train.init_from, params)
    if jax.process_count() > 1:
        state = (params, opt_state, np.int64(start), np.int64(position))
        params, opt_state, start, position = multihost_utils.broadcast_one_to_all(state)
    return params, opt_state, int(start), int(position)


def _check_shapes(cfg: Config, n_dev: int) -> None:
    """What no step could train: a window past the sequence, a batch the devices and
    accumulation steps do not divide."""
    m, tr = cfg.model, cfg.train
    if m.mixer in ("swa", "hybrid", "ttt_kvb", "ttt_e2e") and m.window > cfg.data.seq_len:
        raise UserError(
            f"model.window={m.window}: larger than data.seq_len={cfg.data.seq_len}, so "
            f"every token would see its whole context (full attention); use a window of "
            f"at most {cfg.data.seq_len}, or model.mixer=full"
        )
    if cfg.data.batch_size % (n_dev * tr.grad_accum):
        raise UserError(
            f"data.batch_size={cfg.data.batch_size}: must be a multiple of "
            f"{n_dev} devices x train.grad_accum={tr.grad_accum}"
        )


@dataclass(frozen=True)
class Step:
    """One trained step as hooks see it, once its metrics are on the host."""

    number: int
    values: dict  # loss, grad_norm, lr, inner_lr, tokens_per_s, flops_per_token, mfu
    last: bool  # the last step this call trains (train.steps, or stop_at)
    checkpointed: bool  # a checkpoint is written at this step (and reported with it)


@dataclass
class Hook:
    """`fn(step)` after every `every`-th step (never for 0), and at the last step when
    `at_last`. A hook that `needs_state` reads the parameters of its step: the trainer
    reads every pending metric back before it instead of overlapping the next step."""

    fn: Callable[[Step], None]
    every: int = 1
    at_last: bool = False
    needs_state: bool = False

    def due(self, number: int, last: bool) -> bool:
        return (self.every > 0 and number % self.every == 0) or (self.at_last and last)


class Diverged(Exception):
    """Raised by a hook to end the run as `diverged at step N`."""


class Trainer:
    """A training run as a loop that yields steps, with evaluation, checkpointing,
    logging, the progress bar, the divergence guard and reporting as hooks
    (`add_hook(fn, every=N)`), in the manner of Levanter's `Trainer.add_hook`.

    `run()` trains to the end and writes the final evaluation and checkpoint; `steps()`
    is the loop itself, for a caller that wants to act between steps.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        reporter: Reporter | None = None,
        *,
        devices=None,
        stop_at: int | None = None,
        progress: bool = True,
    ):
        compile_cache.enable()
        cfg = cfg.with_absolute_paths()
        self.cfg, self.out = cfg, Path(out_dir)
        self.dir = RunDir(self.out)
        mesh = data_mesh(devices)
        self.n_dev = mesh.devices.size
        _check_shapes(cfg, self.n_dev)
        data = self._open_data()
        _check_run_dir(self.out, cfg)
        # In a multi-process run every process trains; process 0 alone writes files and
        # reports.
        self.lead = jax.process_index() == 0
        self.reporter = (reporter or Reporter()) if self.lead else Reporter()
        graphdef = self.graphdef = self._restore(mesh)
        self.previous = read_run_info(self.out)
        self.run_info = {
            "status": "running",
            "step": self.start,
            "data_fingerprint": data.fingerprint,
            "bos_id": data.bos_id,
            "devices": self.n_dev,
            "device_kind": mesh.devices.flat[0].device_kind,
        }
        if self.lead:
            with writing(self.dir.info_file.name, self.dir.info_file):
                self.dir.write_info(self.run_info)
        self.log = _Log(self.dir.metrics_file, self.start, enabled=self.lead)
        self.train_step = compile_cache.CachedStep("train", cfg, make_train_step(cfg, graphdef))
        hits = data.recall is not None  # the recall task's accuracy needs the argmax
        self.eval_step = compile_cache.CachedStep(
            "eval-hits" if hits else "eval", cfg, make_eval_step(cfg, graphdef, hits=hits)
        )
        self.last = min(stop_at if stop_at is not None else cfg.train.steps, cfg.train.steps)
        self.result = RunResult("finished", self.start, self.out)
        self.hooks: list[Hook] = []
        self.stop_signal: int | None = None  # set by stop_on_signals
        self.saving: int | None = None  # the checkpoint being written
        self._default_hooks(progress)

    def _open_data(self) -> Dataset:
        """The training and validation loaders; returns the dataset."""
        cfg, tr = self.cfg, self.cfg.train
        data = Dataset(cfg)
        data.check_vocab(cfg.model.vocab_size)
        if tr.init_from:
            _check_init_bos(tr.init_from, data)
        self.loader = data.loader("train", cfg.data.seq_len, cfg.data.batch_size, seed=tr.seed)
        self.val = data.loader("val", cfg.data.seq_len, cfg.data.batch_size)
        return data

    def _restore(self, mesh):
        """Builds the model and its optimizer state, then starts from the run's latest
        checkpoint, `train.init_from` or the fresh init (`initial_state`), on the
        devices; pins the run's config once that start is known good. Returns the graph."""
        cfg, out = self.cfg, self.out
        fresh = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
        opt_state = init_opt_state(cfg, params)
        # Process 0 alone keeps checkpoints: its run dir is the one the sweep persists, and
        # the other processes' nodes need no shared filesystem.
        self.ckpt = Checkpoints(out, keep=cfg.train.keep_checkpoints) if self.lead else None
        try:
            params, opt_state, self.start, self.loader.position = initial_state(
                cfg, self.ckpt, params, opt_state
            )
        except BaseException:
            # A start that fails (a bad train.init_from) leaves nothing that blocks a re-run.
            if self.ckpt is not None:
                self.ckpt.close()
            if fresh:
                shutil.rmtree(out, ignore_errors=True)
            raise
        if self.lead:
            with writing("the run's config", self.dir.config_file):
                self.dir.write_config(cfg)
        self.params = jax.device_put(params, replicated(mesh))
        self.opt_state = jax.device_put(opt_state, replicated(mesh))
        self.put = batch_putter(mesh)
        return graphdef

    # -- hooks ---------------------------------------------------------------------------

    def add_hook(
        self, fn: Callable[[Step], None], every: int = 1, *, at_last=False, needs_state=False
    ) -> Hook:
        hook = Hook(fn, every, at_last, needs_state)
        self.hooks.append(hook)
        return hook

    def _default_hooks(self, progress: bool) -> None:

        tr = self.cfg.train
        limit = max_loss(self.cfg)

        def guard(step: Step) -> None:
            loss = step.values["loss"]
            if not math.isfinite(loss):
                raise Diverged(f"diverged at step {step.number}")
            if loss > limit:
                raise Diverged(
                    f"diverged at step {step.number} (loss {loss:.4g} > train.max_loss={limit:.4g})"
                )

        def log(step: Step) -> None:
            self.log.write({"step": step.number, **step.values})

        def report(step: Step) -> None:
            if not step.checkpointed:  # a checkpointed step is reported with its checkpoint
                self.reporter.metrics(step.number, step.values)

        self.bar = tqdm(
            total=tr.steps,
            initial=self.start,
            disable=not progress,
            desc=self.out.name,
            unit="step",
            dynamic_ncols=True,
        )

        def show(step: Step) -> None:
            self.bar.update(step.number - self.bar.n)
            self.bar.set_postfix(
                loss=f"{step.values['loss']:.4f}", tok_s=f"{step.values['tokens_per_s']:.0f}"
            )

        def evaluate_hook(step: Step) -> None:
            if step.number < tr.steps:  # the last one is part of finishing the run
                self.result.eval_loss = self.evaluate(step.number).loss

        def checkpoint_hook(step: Step) -> None:
            if step.number < self.last:  # the last one is part of finishing the run
                self.save(step.number, step.values)

        self.add_hook(guard)
        self.add_hook(log, max(tr.log_every, 1), at_last=True)
        self.add_hook(report, max(tr.log_every, 1), at_last=True)
        self.add_hook(show)
        self.add_hook(evaluate_hook, tr.eval_every, needs_state=True)
        self.add_hook(checkpoint_hook, tr.checkpoint_every, needs_state=True)

    # -- what the hooks and the end of the run do -----------------------------------------

    def evaluate(self, number: int) -> EvalResult:
        tr = self.cfg.train
        result = evaluate(
            self.eval_step,
            self.params,
            self.val,
            tr.eval_batches,
            self.cfg.ttt.inner_lr,
            self.put,
            window=self.cfg.model.window,
        )
        if tr.telemetry:
            result.extra = self.telemetry(number)
        self.log.write({"step": number, **result.metrics})
        if self.lead:
            with writing("an evaluation table", self.dir.nll_table()):
                result.write_parquet(self.dir.nll_table())
        self.reporter.evaluation(number, result)
        return result

    def telemetry(self, number: int) -> dict[str, float]:
        """`train.telemetry`: the inner steps over the evaluated batches, as metrics and as
        RUN/eval/inner_loop_T*.parquet (the latest evaluation's), and the loss of the same
        batches with the test-time updates skipped (`eval_loss_noinner`)."""
        tr = self.cfg.train
        if not hasattr(self, "_telemetry_step"):
            self._telemetry_step = telemetry_step(self.cfg, self.graphdef)
            self._noinner_step = make_eval_step(self.cfg, self.graphdef, inner=False)
        table = telemetry_table(
            self.cfg, self._telemetry_step, self.params, self.val, tr.eval_batches, self.put
        )
        if self.lead:
            path = self.dir.telemetry_table(self.cfg.data.seq_len)
            with writing("the inner loop's telemetry", path):
                path.parent.mkdir(parents=True, exist_ok=True)
                table.with_columns(step=pl.lit(number)).write_parquet(path)
        # the same batches with the updates skipped: the initial weights alone
        eta = self.cfg.ttt.inner_lr
        off = evaluate(self._noinner_step, self.params, self.val, tr.eval_batches, eta, self.put)
        return {**telemetry_summary(table), "eval_loss_noinner": off.loss}

    def save(self, number: int, values: dict, final: bool = False) -> None:
        if self.ckpt is None:
            return
        state = {"step": number, "position": self.loader.position}
        self.saving = number
        with writing(f"checkpoint step {number}", self.ckpt.directory):
            directory = self.ckpt.save(number, self.params, self.opt_state, state)
        self.saving = None
        self.reporter.checkpoint(number, directory, values, final)

    # -- the loop ----------------------------------------------------------------------------

    def steps(self) -> Iterator[Step]:
        """Train from the start to the last step, yielding each step once its metrics are
        read back (one step behind the device, except where a hook needs the state). A
        hook that raises `Diverged` ends the loop with that status."""
        cfg, tr = self.cfg, self.cfg.train
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        inner = uses_inner_loop(cfg, True)
        flops = flops_per_token(cfg, training=True, inner=inner)
        peak = peak_flops(self.run_info["device_kind"], tr.peak_flops)
        checkpointed = lambda n: (
            n == self.last
            or (  # noqa: E731
                bool(tr.checkpoint_every) and n % tr.checkpoint_every == 0
            )
        )
        t_last = time.perf_counter()
        pending: list = []  # steps dispatched but not yet read back
        for number in range(self.start + 1, self.last + 1):
            if self.stop_signal is not None:  # this step is the last: read all, checkpoint it
                self.last = number
            batch = self.put(next(self.loader))
            self.params, self.opt_state, m = self.train_step(
                self.params, self.opt_state, batch, hyper(cfg, number - 1)
            )
            pending.append((number, m))
            is_last = number == self.last
            state_hooks = [h for h in self.hooks if h.needs_state and h.due(number, is_last)]
            sync = is_last or bool(state_hooks)
            # Read the previous step's metrics while this one runs; all of them at a sync.
            while len(pending) > (0 if sync else 1):
                s, m = pending.pop(0)
                # str() of a float32 is its shortest repr: an lr of 0.3 is logged as 0.3,
                # not float64(float32(0.3)) = 0.30000001192092896.
                values = {k: float(str(v)) for k, v in jax.device_get(m).items()}
                if not inner:  # no inner loop: its learning rate is no curve to show
                    values.pop("inner_lr", None)
                now = time.perf_counter()
                values["tokens_per_s"] = tokens_per_step / max(now - t_last, 1e-9)
                values["flops_per_token"] = flops
                if peak:
                    values["mfu"] = flops * values["tokens_per_s"] / (peak * self.n_dev)
                t_last = now
                step = Step(s, values, s == self.last, checkpointed(s))
                try:
                    for hook in self.hooks:
                        if not hook.needs_state and hook.due(s, step.last):
                            hook.fn(step)
                except Diverged as e:
                    self.result.status, self.result.step = "diverged", s
                    self.result.message = str(e)
                    return
                self.result.step, self.result.loss, self.result.metrics = s, values["loss"], values
                yield step
            for hook in state_hooks:
                hook.fn(Step(number, self.result.metrics, is_last, checkpointed(number)))
            if is_last:  # self.last moves down when a signal asks the run to stop
                return

    def finish(self) -> RunResult:
        """After the loop: the final evaluation and checkpoint, run.json, files closed."""
        result, tr = self.result, self.cfg.train
        if result.status == "diverged":
            self.run_info.update(status="diverged", step=result.step, message=result.message)
        else:
            number = result.step
            values = result.metrics
            if number < tr.steps:
                result.status = "stopped" if self.stop_signal is None else "interrupted"
                result.signal = self.stop_signal
            elif number == self.start and self.previous.get("status") == "finished":
                # nothing left to do
                result.loss = self.previous.get("loss")
                result.eval_loss = self.previous.get("eval_loss")
            else:
                result.eval_loss = self.evaluate(number).loss
                values = {**result.metrics, "eval_loss": result.eval_loss}
            if number > self.start:
                self.save(number, values, final=result.status == "finished")
            self.run_info.update(
                status=result.status, step=number, loss=result.loss, eval_loss=result.eval_loss
            )
        self.bar.close()
        if self.ckpt is not None:
            self.ckpt.close()
        self.log.close()
        if self.lead:
            with writing(self.dir.info_file.name, self.dir.info_file):
                self.dir.write_info(self.run_info)
        return result

    def run(self) -> RunResult:
        with stop_on_signals(self):
            try:
                for _ in self.steps():
                    pass
                return self.finish()
            except KeyboardInterrupt:  # a second Ctrl-C: run.json names the checkpoint kept
                self._abandon()
                raise
            except StorageError as e:
                raise self._storage_failure(e) from None

    def _storage_failure(self, e: StorageError) -> StorageError:
        """A write the disk refused: the partial checkpoint removed, the files closed,
        run.json records the failure; the error's line says what is safe."""
        self.bar.close()
        if self.ckpt is not None:
            try:
                self.ckpt.close()
            except Exception:  # a manager whose save failed may fail to close; its files go next
                pass
            remove_partial_checkpoints(self.dir, self.saving)
        self.log.close()
        kept = self.dir.latest_step()
        safe = (
            f"last complete checkpoint: step {kept}; the same command resumes from it"
            if kept
            else "no complete checkpoint yet; the same command starts again"
        )
        line = f"{e}; {safe}"
        if self.lead:
            self.run_info.update(status="failed", step=kept or 0, message=line)
            try:
                self.dir.write_info(self.run_info)
            except OSError:  # the disk refuses even run.json: the line says it all
                pass
        return StorageError(line, e.errno, e.where)

    def _abandon(self) -> None:
        """Stopped without finishing: run.json tells the truth about what a re-run gets."""
        self.bar.close()
        kept = self.ckpt.latest_step() if self.ckpt is not None else None
        if self.ckpt is not None:
            self.ckpt.close()
        self.log.close()
        if self.lead:
            self.run_info.update(status="interrupted", step=kept or 0)
            self.dir.write_info(self.run_info)


def remove_partial_checkpoints(run: RunDir, step: int | None) -> None:
    """What a failed save leaves in checkpoints/: Orbax's temporary folders, and the step
    being written if it has no manifest yet (it never counted)."""
    if not run.checkpoints.is_dir():
        return
    for p in run.checkpoints.iterdir():
        if not p.name.isdigit() and not p.name.endswith(".unreadable"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if step is not None:
        folder = run.checkpoint(step)
        if folder.is_dir() and not (folder / MANIFEST).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        for tmp in folder.glob(f".{MANIFEST}.tmp"):
            tmp.unlink(missing_ok=True)


def run(cfg: Config, out_dir: str | Path, reporter: Reporter | None = None, **options):
    """Train (or resume) to `train.steps`, evaluating and checkpointing on the way.
    `options` are the Trainer's: `devices`, `progress`, and `stop_at`, which ends early
    after that step with a checkpoint (status `stopped`), as a killed run would have;
    running again continues exactly."""
    return Trainer(cfg, out_dir, reporter, **options).run()
