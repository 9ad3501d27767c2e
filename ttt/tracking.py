"""MLflow conventions shared by single runs (`ttt train`) and sweep trials.

Where runs go: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else `./mlflow.db`. A server
URI is checked before anything else talks to it, so a wrong one costs seconds, not
MLflow's minutes of retries. One run's MLflow record (params, metrics, provenance tags,
eval artifacts, outcome) is written by the functions here, whoever drives the run.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ttt import tags as TAG
from ttt.errors import UserError
from ttt.rundir import RunDir

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
# What a run reports that is worth a metric history in MLflow (plus `system/...`).
METRIC_KEYS = (
    "loss",
    "grad_norm",
    "lr",
    "inner_lr",
    "tokens_per_s",
    "mfu",
    "eval_loss",
)
SYSTEM_PREFIX = "system/"  # MLflow's UI shows these in its "System metrics" tab
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
OUTCOME_STATUS = {
    "finished": "FINISHED",
    "diverged": "FAILED",
    "early_stopped": "KILLED",
    "error": "FAILED",
    "interrupted": "KILLED",
}


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """SQLite in the working directory: no server needed."""
    return f"sqlite:///{Path(cwd or os.getcwd()).absolute() / DEFAULT_DB}"


def resolve_uri(flag: str | None) -> str:
    """The flag, then MLflow's own environment variable, then ./mlflow.db."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def optional_uri(flag: str | None) -> str | None:
    """For commands tracked only when asked: the flag, else MLflow's environment variable,
    else None. A store given is checked and announced before any work starts."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_uri(uri)
        announce(uri)
    return uri


def check_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a tracking server does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        port = parsed.port or 5000
        raise UserError(
            f"tracking URI {uri}: no MLflow server answers ({reason}); start one with "
            f"`ttt tracking serve --port {port}`, or give another --tracking-uri"
        ) from None


def announce(uri: str) -> None:
    print(f"tracking: {uri}", file=sys.stderr)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` store (PATH relative or absolute)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///")
    return Path(path) if path and path != ":memory:" else None


@functools.cache
def _open_sqlite(tracking_uri: str, db: Path) -> None:
    """MLflow creates (and migrates) a SQLite store's tables the first time a process
    opens it, and two processes doing that at once fail ("table ... already exists"): a
    sweep's driver and its first trials, `ttt ui`, a notebook. One at a time, then; once
    per process, as MLflow keeps the opened store for the process's later clients."""
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def client(tracking_uri: str):
    # Not mlflow.set_tracking_uri: it sets $MLFLOW_TRACKING_URI for the whole process,
    # which would then pick the store of every later command run in it.
    from mlflow.tracking import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is not None and db.parent.is_dir():
        _open_sqlite(tracking_uri, db)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(c, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if (db := sqlite_path(tracking_uri)) is not None:  # artifacts beside the database
        location = (db.parent / DEFAULT_ARTIFACTS).absolute().as_uri()
    # Opens on the runs table, not MLflow 3's GenAI traces page.
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def find_run(c, experiment_id: str, tags: dict[str, str]):
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0] if runs else None


def log_params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c, run_id: str, values: dict, step: int) -> None:
    """The tracked keys of one report, finite values only, at `step`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, step)
        for k, v in values.items()
        if (k in METRIC_KEYS or k.startswith(SYSTEM_PREFIX))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    ]
    if metrics:
        c.log_batch(run_id, metrics=metrics)


def log_eval_artifacts(c, run_id: str, run_dir: Path, render=None) -> None:
    """The per-position NLL (Parquet, what `ttt plots` reads), and beside it what the UI
    can show, made by `render(parquet, folder, run params) -> files` when the caller has a
    renderer (`analysis.figures.eval_figure_files`: a PNG and a log-binned CSV). Tracking
    draws nothing itself: figures are the analysis package's job."""
    import tempfile

    files = RunDir(run_dir).nll_tables()  # not the other kinds in eval/ (NIAH's rows)
    if not files:
        return
    params = c.get_run(run_id).data.params if render is not None else {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            c.log_artifact(run_id, str(f), artifact_path="eval")
            for extra in render(f, Path(tmp), params) if render is not None else []:
                c.log_artifact(run_id, str(extra), artifact_path="eval")


# The run description (the UI's "Description" box): what each metric is, with its unit.
DESCRIPTION = """**Metrics** (x axis: optimizer step)
- `loss`: training loss, nats per token (mean next-token cross-entropy of the outer objective)
- `eval_loss`, `final_eval_loss`: validation loss, nats per token
- `grad_norm`: global L2 norm of the outer gradient (before clipping)
- `lr`: outer learning rate; `inner_lr`: inner (test-time) learning rate, per step (only
  where there is an inner loop)
- `tokens_per_s`: training throughput, tokens per second (all devices)
- `mfu`: fraction of the devices' peak FLOP/s (the tag `ttt.flops_per_token` holds the
  model FLOPs per token it is computed from)
- `system/...`: MLflow's system metrics, each named with its unit (percent, megabytes)

**Artifacts**: `eval/nll_by_position.*`: validation NLL by token position (nats per token):
Parquet (all positions), PNG and a log-binned CSV.
"""


def run_tags(role: str, source: str, **tags: str) -> dict[str, str]:
    """Tags every run this project creates: its role, the command as Source, and the
    description with units."""
    return {
        TAG.ROLE: role,
        "mlflow.source.name": source,
        "mlflow.note.content": DESCRIPTION,
        **tags,
    }


def ui_base(tracking_uri: str, port: int = 5000) -> str:
    """Where a user sees these runs: the server itself, or what `ttt ui` serves."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


def run_link(
    tracking_uri: str,
    experiment_id: str | None = None,
    run_id: str | None = None,
    trials_chart: bool = False,
):
    """A UI link in model-training mode (MLflow 3 opens on GenAI traces otherwise): the
    experiments, an experiment's runs, or one run. `trials_chart`: a sweep's trials side
    by side in the chart view (filtered to the trials, which the UI then lists flat
    instead of folded under the sweep's parent run)."""
    from urllib.parse import urlencode

    path = "#/experiments"
    if experiment_id is not None:
        path += f"/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    query = {"workflowType": "machine_learning"}
    if trials_chart:
        query.update(compareRunsMode="CHART", searchFilter=f"tags.`{TAG.ROLE}` = 'trial'")
    return f"{ui_base(tracking_uri)}/{path}?{urlencode(query)}"


def finish(c, run_id: str, outcome: str, message: str = "") -> None:
    c.set_tag(run_id, TAG.OUTCOME, outcome)
    if message:
        c.set_tag(run_id, TAG.MESSAGE, message[:5000])
    c.set_terminated(run_id, status=OUTCOME_STATUS[outcome])


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        p = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def provenance() -> dict[str, str]:
    """What a reader needs to trust a run later: code, JAX, devices."""
    from importlib.metadata import PackageNotFoundError, version

    import jax

    try:
        pkg = version("ttt-e2e")
    except PackageNotFoundError:
        pkg = "unknown"
    devices = jax.devices()
    tags = {
        TAG.VERSION: pkg,
        "jax.version": jax.__version__,
        "jax.backend": jax.default_backend(),
        "device.kind": devices[0].device_kind,
        "device.count": str(jax.device_count()),
        "jax.processes": str(jax.process_count()),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        tags.update(
            {
                TAG.GIT_COMMIT: commit,
                TAG.GIT_DIRTY: str(bool(dirty)).lower(),
                "mlflow.source.git.commit": commit,  # the UI's "Source" column
            }
        )
    return tags


class SystemSampler:
    """MLflow's own CPU/memory (and, with NVML, GPU) monitors, read at each report: the
    CPU share is the average since the previous read, so no sampling thread is needed."""

    def __init__(self):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self.monitors = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):
            pass  # no NVML here: CPU and memory only

    def read(self) -> dict[str, float]:
        out = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update({f"{SYSTEM_PREFIX}{k}": v for k, v in m.aggregate_metrics().items()})
            m.clear_metrics()
        return out


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
        self.run_id = None  # opened at the first report: a start that fails records nothing

    def _open(self) -> str:
        if self.run_id is not None:
            return self.run_id
        self.c = c = client(self.uri)
        exp = ensure_experiment(c, self.experiment, self.uri)
        found = find_run(c, exp, {TAG.RUN_DIR: str(self.out)})
        self.last_step = 0
        if found is not None:
            self.run_id = found.info.run_id
            history = c.get_metric_history(self.run_id, "loss")
            self.last_step = max((m.step for m in history), default=0)
            c.update_run(self.run_id, status="RUNNING")
            steps = str(self.cfg.train.steps)
            if found.data.params.get("train.steps") != steps:  # params are immutable
                c.set_tag(self.run_id, TAG.EXTENDED_TO_STEPS, steps)
        else:
            run = c.create_run(
                exp,
                run_name=self.out.name,
                tags=run_tags("run", f"ttt train --out {self.out}", **{TAG.RUN_DIR: str(self.out)}),
            )
            self.run_id = run.info.run_id
            log_params(c, self.run_id, self.cfg.flat())
        from ttt.train.flops import flops_per_token
        from ttt.train.step import uses_inner_loop

        flops = flops_per_token(self.cfg, training=True, inner=uses_inner_loop(self.cfg, True))
        tags = {
            **provenance(),
            TAG.CHECKPOINT_DIR: str(RunDir(self.out).checkpoints),
            TAG.FLOPS_PER_TOKEN: f"{flops:.6g}",
        }
        for k, v in tags.items():
            c.set_tag(self.run_id, k, v)
        self.sampler = SystemSampler() if self.system_metrics else None
        return self.run_id

    def _log(self, step: int, values: dict) -> None:
        self._open()
        if step <= self.last_step:
            return  # logged before a resume
        self.last_step = step
        system = self.sampler.read() if self.sampler else {}
        values = {k: v for k, v in values.items() if k != "eval_loss"}  # see evaluation()
        log_metrics(self.c, self.run_id, {**values, **system}, step)

    def metrics(self, step: int, values: dict) -> None:
        self._log(step, values)

    def checkpoint(self, step: int, directory: Path, values: dict, final: bool = False) -> None:
        self._log(step, values)
        self.c.set_tag(self.run_id, TAG.CHECKPOINT, str(directory))

    def evaluation(self, step: int, result) -> None:
        self._open()
        log_metrics(self.c, self.run_id, {"eval_loss": result.loss}, step)

    def close(self, outcome: str, message: str = "", eval_loss: float | None = None) -> None:
        if self.run_id is None:
            return
        if outcome == "finished":
            log_eval_artifacts(self.c, self.run_id, self.out, self.render)
            if eval_loss is not None:
                self.c.log_metric(self.run_id, "final_eval_loss", float(eval_loss))
        finish(self.c, self.run_id, outcome, message)


def log_evaluation(uri: str, experiment: str, run_dir: Path, summary: dict, parquet: Path):
    """One MLflow run per (evaluated run, context length), tagged `ttt.role=eval`: the
    evaluated run's config with `data.seq_len` at the length evaluated, the loss as
    `final_eval_loss`, and the per-position NLL. Evaluating the same pair again updates
    that run instead of adding a duplicate."""
    seq_len = summary["seq_len"]
    return _log_result(
        uri,
        experiment,
        run_dir,
        role="eval",
        key={TAG.SEQ_LEN: str(seq_len)},
        params={"data.seq_len": seq_len, "eval.checkpoint_step": summary["step"]},
        metrics={"final_eval_loss": summary["loss"]},
        artifact=parquet,
        source=f"ttt eval {Path(run_dir).absolute()} --seq-len {seq_len}",
        step=summary["step"],
    )


def log_niah(uri: str, experiment: str, run_dir: Path, accuracy, parquet: Path) -> list[str]:
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
    c = client(uri)
    exp = ensure_experiment(c, experiment, uri)
    key = {TAG.EVAL_OF: str(run_dir), TAG.ROLE: role, **key}
    found = find_run(c, exp, key)
    if found is not None:
        run_id = found.info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        task = key.get(TAG.NIAH_TASK)
        name = f"{run_dir.name}{' ' + task if task else ''} T={key[TAG.SEQ_LEN]}"
        tags = {**run_tags(role, source), **key, **provenance()}
        run_id = c.create_run(exp, run_name=name, tags=tags).info.run_id
        log_params(c, run_id, {**cfg.flat(), "eval.run": run_dir.name, **params})
    for name, value in metrics.items():
        c.log_metric(run_id, name, float(value), step=step)
    c.log_artifact(run_id, str(artifact), artifact_path="eval")
    finish(c, run_id, "finished")
    return run_id


def log_bench_rows(tracking_uri: str, rows: list[dict], experiment: str = "bench") -> list[str]:
    """One run per `ttt bench` row (tag `ttt.role=bench`): what the latency figures read."""
    from mlflow.entities import Metric, Param

    c = client(tracking_uri)
    exp = ensure_experiment(c, experiment, tracking_uri)
    now = int(time.time() * 1000)
    ids = []
    for row in rows:
        run = c.create_run(
            exp,
            run_name=f"{row['mode']}-{row['preset']}-{row['mixer']}-T{row['seq_len']}",
            tags={TAG.ROLE: "bench", TAG.OUTCOME: "finished"},
        )
        params = [
            Param(k, str(row[k]))
            for k in ("mode", "preset", "mixer", "seq_len", "batch", "device", "remat")
        ]
        metrics = [
            Metric(k, float(row[k]), now, 0)
            for k in (
                "step_s",
                "step_s_min",
                "step_s_max",
                "tokens_per_s",
                "compile_s",
                "mfu",
                "peak_mem_gb",
            )
            if row.get(k) is not None
        ]
        c.log_batch(run.info.run_id, metrics=metrics, params=params)
        c.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return ids
