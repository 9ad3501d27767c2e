"""The records each command keeps in MLflow, written through `MlflowRun`: a single
`ttt train` run (a `ttt.train.Reporter`), an evaluation, a NIAH result and bench rows.
A sweep's trials and parent are written by `sweeps.tracking` through the same class."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from ttt import tags as TAG
from ttt.errors import UserError, writing
from ttt.rundir import RunDir, companion
from ttt.tracking import queue as queue_files
from ttt.tracking.provenance import SystemSampler, provenance
from ttt.tracking.queue import WriteQueue
from ttt.tracking.store import check_uri, client
from ttt.tracking.tracker import MlflowRun, Tracker, apply_record, described, run_tags


def log_eval_artifacts(run: Tracker, run_dir: Path, render=None, params=None, name="") -> None:
    """The per-position NLL (Parquet, what `ttt plots` reads), and beside it what the UI
    can show, made by `render(parquet, folder, run params, run name) -> files` when the caller has a
    renderer (`analysis.run_figures.eval_figure_files`: a PNG and a log-binned CSV). Tracking
    draws nothing itself: figures are the analysis package's job. `params`: the run's
    flat config, as MLflow holds it (strings)."""
    params = {k: str(v) for k, v in (params or {}).items()}
    files = RunDir(run_dir).nll_tables()  # not the other kinds in eval/ (NIAH's rows)
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            run.log_artifact(f, "eval")
            for kind in ("bins", "recall"):  # its standard errors, accuracy by distance
                if companion(f, kind).is_file():
                    run.log_artifact(companion(f, kind), "eval")
            with writing("evaluation figures", Path(tmp)):
                extras = render(f, Path(tmp), params, name) if render is not None else []
            for extra in extras:
                run.log_artifact(extra, "eval")


# How long `ttt train` waits at its end for tracking records a server has not taken yet.
DRAIN_TIMEOUT = 60.0


class MlflowReporter:
    """A `ttt.train.Reporter` that records one `ttt train` run in MLflow, with the same
    params, metrics, tags and artifacts as a sweep trial's run. Running the same --out
    again continues the same MLflow run."""

    def __init__(
        self, uri: str, experiment: str, cfg, out_dir: Path, system_metrics=True, render=None
    ):
        self.uri, self.experiment, self.cfg = uri, experiment, cfg
        self.render = render  # draws the eval artifacts (see log_eval_artifacts)
        self.out = Path(out_dir).absolute()
        self.system_metrics = system_metrics
        self.mfu_described = False
        self.run: MlflowRun | None = (
            None  # opened at the first report: a start that fails records nothing
        )
        self.queue: WriteQueue | None = None
        self.drain_timeout = DRAIN_TIMEOUT

    def _open(self) -> MlflowRun:
        if self.run is not None:
            return self.run
        from ttt.train.flops import (
            flops_per_token,  # deferred: JAX, only to describe a training run
        )
        from ttt.train.step import uses_inner_loop  # deferred: as above

        self.run = run = MlflowRun.open(
            self.uri,
            self.experiment,
            {TAG.RUN_DIR: str(self.out)},
            name=self.out.name,
            tags=run_tags("run", f"ttt train --out {self.out}"),
            params=self.cfg.flat(),
        )
        # every write from here on goes through a queue: the training loop never waits
        self.queue = WriteQueue(
            functools.partial(apply_record, run.c), RunDir(self.out).tracking_spool, self.uri
        )
        run.through(self.queue)
        steps = str(self.cfg.train.steps)
        if run.found is not None and run.found.data.params.get("train.steps") != steps:
            run.set_tags({TAG.EXTENDED_TO_STEPS: steps})  # params are immutable
        flops = flops_per_token(self.cfg, training=True, inner=uses_inner_loop(self.cfg, True))
        run.set_tags(
            {
                **provenance(),
                TAG.CHECKPOINT_DIR: str(RunDir(self.out).checkpoints),
                TAG.FLOPS_PER_TOKEN: f"{flops:.6g}",
            }
        )
        self.sampler = SystemSampler() if self.system_metrics else None
        return run

    def _log(self, step: int, values: dict) -> None:
        run = self._open()
        values = {k: v for k, v in values.items() if k != "eval_loss"}  # see evaluation()
        if step > run.last_step:  # not logged before a resume
            run.log({**values, **(self.sampler.read() if self.sampler else {})}, step)
            if not self.mfu_described and (note := described(values)):
                run.set_tags(note)  # the description's `mfu` line, now that it is logged
                self.mfu_described = True

    def metrics(self, step: int, values: dict) -> None:
        self._log(step, values)

    def checkpoint(self, step: int, directory: Path, values: dict, final: bool = False) -> None:
        self._log(step, values)
        self.run.set_tags({TAG.CHECKPOINT: str(directory)})

    def evaluation(self, step: int, result) -> None:
        self._open().log_summary(result.metrics, step)

    def close(self, outcome: str, message: str = "", eval_loss: float | None = None) -> None:
        if self.run is None:
            return
        if outcome == "finished":
            log_eval_artifacts(self.run, self.out, self.render, self.cfg.flat(), self.out.name)
            if eval_loss is not None:
                self.run.log_summary({"final_eval_loss": eval_loss})
        self.run.finish(outcome, message)
        if self.queue is not None:  # drain for a bounded time, then say what is pending
            self.queue.close(self.drain_timeout)


# What an evaluation's summary holds besides its metrics.
SUMMARY_FIELDS = ("step", "seq_len", "loss", "sequences", "inner")


def log_evaluation(uri: str, experiment: str, run_dir: Path, summary: dict, parquet,
                   role: str | None = None):  # fmt: skip
    """One MLflow run per (evaluated run, context length), tagged `ttt.role=eval`: the
    evaluated run's config with `data.seq_len` at the length evaluated, the loss as
    `final_eval_loss` with its standard error, context use (and on the recall task its
    accuracy by distance), and the per-position NLL. Evaluating the same pair again
    updates that run instead of adding a duplicate. An evaluation with the test-time
    updates skipped (`--no-inner`) is its own run, of role `eval_noinner`; one on the
    recall task (`--task recall`) of role `recall`. `parquet`: a file or a list."""
    seq_len = summary["seq_len"]
    inner = summary.get("inner", True)
    role = role or ("eval" if inner else "eval_noinner")
    extra = {k: v for k, v in summary.items() if k not in SUMMARY_FIELDS}
    flag = {"eval_noinner": " --no-inner", "recall": " --task recall"}.get(role, "")
    return _log_result(
        uri,
        experiment,
        run_dir,
        role=role,
        key={TAG.SEQ_LEN: str(seq_len)},
        params={"data.seq_len": seq_len, "eval.checkpoint_step": summary["step"]},
        metrics={"final_eval_loss": summary["loss"], **extra},
        artifact=parquet,
        source=f"ttt eval {Path(run_dir).absolute()} --seq-len {seq_len}{flag}",
        step=summary["step"],
    )


class EvalTracker:
    """`ttt eval`'s tracking sink (`ttt.evaluation.Sinks.track`): each measurement as the
    MLflow run of its kind, with its tables and figures as artifacts (the NLL of
    `--tokens` is not tracked)."""

    def __init__(self, uri: str, experiment: str):
        self.uri, self.experiment = uri, experiment

    def __call__(self, m, run_dir: Path) -> None:
        files = [p for p in [*m.tables, *m.figures] if p.suffix != ".json"]
        if m.kind in ("loss", "noinner", "recall"):
            role = "recall" if m.kind == "recall" else None
            log_evaluation(self.uri, self.experiment, run_dir, m.summary, files, role)
        elif m.kind == "telemetry":
            log_telemetry(self.uri, self.experiment, run_dir, m.table, files)
        elif m.kind == "niah":
            log_niah(self.uri, self.experiment, run_dir, m.table, files)


def log_telemetry(uri: str, experiment: str, run_dir: Path, table, files: list[Path]) -> str:
    """`ttt eval --telemetry` as an MLflow run (role `telemetry`) per (evaluated run,
    context length): what the inner steps bought as metrics, the table and its figure."""
    from ttt.train.telemetry import telemetry_summary  # deferred: as above

    seq_len, step = int(table["seq_len"][0]), int(table["step"][0])
    return _log_result(
        uri,
        experiment,
        run_dir,
        role="telemetry",
        key={TAG.SEQ_LEN: str(seq_len)},
        params={"data.seq_len": seq_len, "eval.checkpoint_step": step},
        metrics=telemetry_summary(table),
        artifact=files,
        source=f"ttt eval {Path(run_dir).absolute()} --seq-len {seq_len} --telemetry",
        step=step,
    )


def log_niah(uri: str, experiment: str, run_dir: Path, accuracy, parquet) -> list[str]:
    """One MLflow run per (evaluated run, NIAH task, context length), tagged
    `ttt.role=niah`, with `niah_accuracy` and every sample's output (Parquet)."""
    ids = []
    for row in accuracy.iter_rows(named=True):
        task, seq_len = row["task"], row["seq_len"]
        ids.append(
            _log_result(
                uri,
                experiment,
                run_dir,
                role="niah",
                key={TAG.SEQ_LEN: str(seq_len), TAG.NIAH_TASK: task},
                params={"data.seq_len": seq_len, "niah.task": task, "niah.samples": row["samples"]},
                metrics={"niah_accuracy": row["accuracy"]},
                artifact=parquet,
                source=f"ttt eval {Path(run_dir).absolute()} --task niah --seq-len {seq_len}",
            )
        )
    return ids


def _log_result(
    uri, experiment, run_dir, *, role, key, params, metrics, artifact, source, step=0
) -> str:
    """An evaluation of a run as an MLflow run (role `eval` or `niah`), found again by
    the evaluated run's path and `key` so that a repeat updates it."""
    run_dir = Path(run_dir).absolute()
    cfg = RunDir(run_dir).config()
    key = {TAG.EVAL_OF: str(run_dir), TAG.ROLE: role, **key}
    task = key.get(TAG.NIAH_TASK)
    run = MlflowRun.open(
        uri,
        experiment,
        key,
        name=f"{run_dir.name}{' ' + task if task else ''} T={key[TAG.SEQ_LEN]}"
        + {"eval_noinner": " (no inner)", "telemetry": " (inner loop)", "recall": " (recall)"}.get(
            role, ""
        ),
        tags={**run_tags(role, source), **provenance()},
        params={**cfg.flat(), "eval.run": run_dir.name, **params},
    )
    run.log_summary(metrics, step)
    for path in artifact if isinstance(artifact, list) else [artifact]:
        run.log_artifact(path, "eval")
    run.finish("finished")
    return run.run_id


BENCH_PARAMS = ("mode", "preset", "mixer", "seq_len", "batch", "device", "remat")
BENCH_METRICS = (
    "step_s",
    "step_s_min",
    "step_s_max",
    "tokens_per_s",
    "compile_s",
    "mfu",
    "peak_mem_gb",
)


def log_bench_rows(tracking_uri: str, rows: list[dict], experiment: str = "bench") -> list[str]:
    """One run per `ttt bench` row (tag `ttt.role=bench`): what the latency figures read."""
    ids = []
    for row in rows:
        run = MlflowRun.open(
            tracking_uri,
            experiment,
            None,  # every measurement is a new run
            name=f"{row['mode']}-{row['preset']}-{row['mixer']}-T{row['seq_len']}",
            tags={TAG.ROLE: "bench"},
            params={k: row[k] for k in BENCH_PARAMS},
        )
        run.log_summary({k: row[k] for k in BENCH_METRICS if row.get(k) is not None})
        run.finish("finished")
        ids.append(run.run_id)
    return ids


def flush_queue(folder: Path, uri: str | None = None, timeout: float = DRAIN_TIMEOUT) -> tuple:
    """Send what a tracking queue's folder still holds (`ttt tracking flush`): a run
    directory (its tracking/ folder), a sweep's queue folder, or the folder itself.
    Returns (sent, still pending, refused for good, the server)."""
    folder = Path(folder)
    if RunDir(folder).tracking_spool.is_dir():
        folder = RunDir(folder).tracking_spool
    meta = folder / queue_files.META
    if not meta.is_file():
        raise UserError(f"DIR={str(folder)!r}: not a tracking queue's folder (no {meta.name})")
    uri = uri or json.loads(meta.read_text()).get("uri")
    if not uri:
        raise UserError(f"DIR={str(folder)!r}: names no tracking server; give --tracking-uri")
    if not queue_files.pending_records(folder):
        return 0, 0, 0, uri
    check_uri(uri)
    q = WriteQueue(functools.partial(apply_record, client(uri)), folder, uri)
    left = q.close(timeout)
    return q.sent, left, q.rejected, uri
