"""`ttt sweep run`: a sweep spec as Ray Tune trials, tracked in MLflow.

Re-running the same command resumes: each stage's Tune experiment is restored from its
storage folder (finished trials stay finished, unfinished ones continue from their last
checkpoint), and the MLflow parent and child runs are found again by their tags.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.util.state import list_jobs

from sweeps.cluster import loopback_only
from sweeps.ray_compat import fit, loopback_mode, name_trial_actors, token_auth, token_source
from sweeps.spec import Stage, SweepSpec, TrialStart
from sweeps.tracking import DRAIN_TIMEOUT, MlflowSweepCallback
from ttt import process
from ttt import tags as TAG
from ttt.data.floors import NAMES, Floors, as_tag, floors_of
from ttt.data.recall import SOURCE as RECALL
from ttt.errors import UserError
from ttt.rundir import RunDir
from ttt.settings import settings
from ttt.tracking import MlflowRun, check_uri, find_run, resolve_uri, run_link
from ttt.tracking.queue import WriteQueue, sweep_queue_folder
from ttt.tracking.tracker import apply_record
from ttt.tracking.views import TRIALS_VIEW, trials_view, view_tag

DEFAULT_STORAGE = "ray_results"


class _TuneResumeAdvice(logging.Filter):
    """Tune's "Resume experiment with: Tuner.restore(...)" after a stop is not how a `ttt`
    user resumes; the driver prints the `ttt` command instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


def flat_params(spec: SweepSpec, trial_config: dict) -> dict:
    """The resolved config of a trial, flattened: the child run's MLflow params."""
    return TrialStart.of(trial_config).config(spec).flat()


def trial_entry(config: dict, spec: SweepSpec) -> None:
    """Tune's trainable (module level, so that a restore finds it under the same name)."""
    from sweeps.trial import (
        trial_main,  # deferred: the trial's module loads JAX, which the driver never needs
    )

    trial_main(TrialStart.of(config), spec)


@dataclass
class StageResult:
    name: str
    rows: list[dict] = field(default_factory=list)  # trial, outcome, metric, checkpoint


@dataclass
class SweepResult:
    spec: SweepSpec
    parent_run_id: str
    tracking_uri: str
    stages: list[StageResult] = field(default_factory=list)


def trial_name(trial) -> str:
    """Readable trial names: the grid point's values, then Tune's id."""
    start = TrialStart.of(trial.config)
    parts = [f"{k.split('.')[-1]}={v}" for k, v in start.point.items()]
    if start.stage:
        parts.insert(0, start.stage)
    return "_".join([*parts, trial.trial_id])[:120] or trial.trial_id


def trial_dirname(trial) -> str:
    return trial.trial_id


def _domain(kind: str, args: list):

    return {
        "choice": lambda: tune.choice(args),
        "uniform": lambda: tune.uniform(*args),
        "loguniform": lambda: tune.loguniform(*args),
        "randint": lambda: tune.randint(*args),
    }[kind]()


def _scheduler(spec: SweepSpec, max_steps: int):
    s = spec.scheduler
    if s["type"] == "fifo":
        return None

    # Rung decisions need a metric in every report: the training loss (eval comes only at
    # the end, or every `eval_every` steps).
    return ASHAScheduler(
        time_attr="step",
        metric=s.get("metric", "loss"),
        mode=s.get("mode", "min"),
        max_t=int(s.get("max_t", max_steps)),
        grace_period=int(s.get("grace_period", 1)),
        reduction_factor=float(s.get("reduction_factor", 4)),
        brackets=int(s.get("brackets", 1)),
    )


def _search_alg(spec: SweepSpec):
    if spec.search_alg == "basic":
        return None
    try:
        from ray.tune.search.optuna import (
            OptunaSearch,  # deferred: Optuna loads only for a spec that asks for it
        )
    except ImportError:
        raise UserError(
            f"{spec.path}: search_alg: optuna is not installed (pip install optuna), or use basic"
        ) from None

    class FinalMetricOptuna(OptunaSearch):
        """Trials report `eval_loss` with their last result (and every `eval_every`
        steps when set): Optuna learns from those and skips the reports that carry only
        the training loss."""

        def on_trial_result(self, trial_id: str, result: dict):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return FinalMetricOptuna(metric=spec.metric, mode=spec.mode)


def trial_resources(spec: SweepSpec):
    """One node's share, or for `nodes: N` a placement group of N bundles on N distinct
    nodes: the trial itself runs in the first bundle as JAX process 0 and places one
    peer process in each other bundle (sweeps/trial.py)."""

    cpu, gpu, nodes = spec.resources["cpu"], spec.resources["gpu"], spec.resources["nodes"]
    if nodes == 1:
        return {"cpu": cpu, "gpu": gpu}
    bundle = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return tune.PlacementGroupFactory([bundle] * nodes, strategy="STRICT_SPREAD")


def storage_root(storage_path: str | None, spec: SweepSpec | None = None) -> str:
    """Where Tune keeps results: a URI (s3://, gs://, file://) goes to Tune unchanged; a
    plain path is made absolute."""
    root = storage_path or (spec.storage_path if spec else "") or DEFAULT_STORAGE
    return root if "://" in root else str(Path(root).absolute())


@dataclass(frozen=True)
class Rerun:
    """What a resumed sweep does with trials that ended in an error (Tune's restore)."""

    resume_errored: bool = False  # continue them from their last checkpoint
    restart_errored: bool = False  # start them again from scratch


def _tuner(
    spec: SweepSpec,
    name: str,
    param_space: dict,
    callback,
    storage: str,
    max_steps: int,
    rerun: Rerun = Rerun(),
):

    trainable = tune.with_resources(
        tune.with_parameters(trial_entry, spec=spec), trial_resources(spec)
    )
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"resuming {path}", file=sys.stderr)
        return tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=rerun.resume_errored,
            restart_errored=rerun.restart_errored,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=spec.num_samples,
            scheduler=_scheduler(spec, max_steps),
            search_alg=_search_alg(spec),
            max_concurrent_trials=spec.max_concurrent or None,
            reuse_actors=False,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[callback],
            stop={"time_total_s": spec.stop_time_s} if spec.stop_time_s else None,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=settings().tune_verbose,
        ),
    )


def _rows(results, spec: SweepSpec) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        outcome = m.get("outcome") or ("error" if r.error else "early_stopped")
        rows.append(
            {
                "trial": m.get("trial_id", ""),
                "outcome": outcome,
                "step": m.get("step"),
                spec.metric: m.get(spec.metric),
                "checkpoint": r.checkpoint,
                "config": r.config,
            }
        )
    return rows


def _starts(spec: SweepSpec, stage: Stage, rows: list[dict]) -> list[dict]:
    done = [
        r
        for r in rows
        if r["outcome"] == "finished" and r[spec.metric] is not None and r["checkpoint"] is not None
    ]
    if not done:
        return []
    if stage.start_from == "best":
        key = lambda r: r[spec.metric] if spec.mode == "min" else -r[spec.metric]  # noqa: E731
        done = [min(done, key=key)]
    return [
        dataclasses.replace(TrialStart.of(r["config"]), init_from=r["checkpoint"].path).as_dict()
        for r in done
    ]


def say_if_waiting(spec: SweepSpec) -> None:
    """Before a stage starts: when the cluster has fewer free CPUs than one trial needs,
    say that its trials wait, and for which other sweeps (Tune's table only shows them
    PENDING)."""

    need = spec.resources["cpu"]
    free = ray.available_resources().get("CPU", 0.0)
    if free >= need:
        return
    others = []
    try:
        mine = os.environ.get("RAY_JOB_SUBMISSION_ID")  # set by Ray in a job's driver
        for job in list_jobs(raise_on_missing_output=False):
            name = (job.metadata or {}).get(TAG.SWEEP)
            if name and job.status == "RUNNING" and job.submission_id != mine:
                others.append(name)
    except (ConnectionError, RuntimeError, ValueError, OSError):
        pass  # the state API is away: the line below still says why trials wait
    held = f" (held by sweep {', '.join(sorted(set(others)))})" if others else ""
    print(
        f"sweep {spec.name}: its trials wait for {need:g} CPU each; the cluster has {free:g} "
        f"free{held}. They start as CPUs free up.",
        file=sys.stderr,
        flush=True,
    )


def print_monitoring(context, tracking_uri: str, experiment_id: str) -> None:
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}", file=sys.stderr)
        print(
            "  token auth is on for local clusters (Ray >= 2.59): `ray get-auth-token` "
            "prints the token to paste in the browser; API clients send "
            "'Authorization: Bearer <token>'",
            file=sys.stderr,
        )
    serve = "" if tracking_uri.startswith("http") else f" (ttt ui --tracking-uri {tracking_uri})"
    table = run_link(tracking_uri, experiment_id, view=TRIALS_VIEW)
    print(f"MLflow runs: {table}{serve}", file=sys.stderr)
    chart = run_link(tracking_uri, experiment_id, view=TRIALS_VIEW, charts=True)
    print(f"  the trials' loss and eval_loss side by side: {chart}", file=sys.stderr)


def check_init_from(spec: SweepSpec) -> None:
    """Every local run a trial starts from (or, with `task: eval`, evaluates) holds
    checkpoints, before Ray starts (`--dry-run` lists trials without this check)."""
    for point in spec.points:
        init = spec.config(point, {}).train.init_from
        if init and "://" not in init and not RunDir(init).has_checkpoints():
            raise UserError(
                f"{spec.path}: train.init_from={init!r}: not a run directory with checkpoints "
                "(`ttt import reference` or `ttt train` writes one)"
            )


def open_parent(spec: SweepSpec, tracking_uri: str, storage: str) -> MlflowRun:
    """The sweep's parent run: found again by the sweep's name (refused when its spec
    changed since), or created with the spec as an artifact and, as params, the values
    each swept key takes (the UI's columns for it)."""
    swept = sorted({k for point in spec.points for k in point} | set(spec.random))
    values = {k: list(dict.fromkeys(str(p[k]) for p in spec.points if k in p)) for k in swept}
    values.update({k: [f"{kind}{tuple(args)}"] for k, (kind, args) in spec.random.items()})
    parent = MlflowRun.open(
        tracking_uri,
        spec.name,
        {TAG.ROLE: "sweep", TAG.SWEEP: spec.name},
        name=spec.name,
        tags={
            TAG.SPEC: str(Path(spec.path).absolute()),
            TAG.SPEC_DIGEST: spec.digest(),
            TAG.OVERRIDES: " ".join(spec.cli_overrides),
            TAG.STORAGE_PATH: storage,
            TAG.SWEPT: ", ".join(swept),
            "mlflow.source.name": f"ttt sweep run {spec.path}",  # the UI's Source column
        },
        params={
            **{f"sweep.{k}": ", ".join(v) for k, v in values.items()},
            "sweep.trials": len(spec.points) * spec.num_samples,
            "sweep.stages": ", ".join(["main", *(st.name for st in spec.stages)]),
        },
        check=functools.partial(_same_sweep, spec),
    )
    if parent.found is None:
        parent.log_artifact(spec.path, "spec")
    note = f"Sweep {spec.name}: {spec.path}"
    parent.c.set_experiment_tag(parent.experiment_id, "mlflow.note.content", note)
    # What the printed links open on: the trials flat, their swept keys and losses as
    # columns, their curves (ttt.tracking.views)
    trial = spec.task != "eval"
    view = trials_view(swept, spec.metric, spec.mode, "trial" if trial else "eval",
                       curves=("loss", "eval_loss") if trial else ())  # fmt: skip
    parent.c.set_experiment_tag(parent.experiment_id, *view_tag(view, TRIALS_VIEW))
    link = run_link(tracking_uri, parent.experiment_id, view=TRIALS_VIEW, charts=True)
    parent.set_tags({TAG.TRIALS_VIEW: link})
    return parent


def log_floors(parent: MlflowRun, spec: SweepSpec) -> dict[str, Floors]:
    """The n-gram floors of every corpus the sweep's trials read (`ttt.data.floors`;
    computed once per dataset fingerprint), on the parent run: as a tag (JSON, every
    source) and, for a sweep on one corpus, as metrics `floor_1` .. `floor_N`. The recall
    task has none: its floor is chance."""
    sources = {}
    for point in spec.points:
        cfg = spec.config(point, {})
        if cfg.data.source != RECALL:
            sources.setdefault(cfg.data.source, cfg.data.cache_dir)
    found = {}
    for source, cache_dir in sources.items():
        try:
            found[source] = floors_of(source, cache_dir)
        except UserError as e:  # the trials will say the same, in their own words
            print(f"floors of {source}: not computed ({e})", file=sys.stderr)
    if found:
        parent.set_tags({TAG.FLOORS: as_tag(found)})
        if len(found) == 1:
            parent.log_summary(next(iter(found.values())).metrics())
        for source, f in found.items():
            values = ", ".join(f"{NAMES[k]} {v:.3f}" for k, v in sorted(f.orders.items()))
            print(f"floors of {source} (held-out nats per token): {values}", file=sys.stderr)
    return found


def join_ray(address: str | None):
    """Ray for the sweep: the caller's (a Ray job's driver), the cluster at `address`, or
    a cluster of its own. Returns the runtime context and whether it was started here."""

    if ray.is_initialized():
        return ray.get_runtime_context(), False
    kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
    try:
        # "local": a cluster of its own, never one that `ray start` left running here
        return ray.init(address=address or "local", log_to_driver=True, **kwargs), address is None
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address is None:
            raise
        raise init_error(address, e) from None


def run_sweep(
    spec: SweepSpec,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
    rerun: Rerun = Rerun(),
) -> SweepResult:

    driver_process(spec)
    tracking_uri = resolve_uri(tracking_uri)
    check_uri(tracking_uri)
    check_init_from(spec)
    if address is not None:
        connect_env(address)
    storage = storage_root(storage_path, spec)
    parent = open_parent(spec, tracking_uri, storage)
    # Every write of the sweep from here on (the parent's, the trials', the driver log's)
    # goes through one queue: neither Tune's loop nor the driver's end waits on the server.
    queue = WriteQueue(
        functools.partial(apply_record, parent.c),
        sweep_queue_folder(storage, spec.name),
        tracking_uri,
    )
    parent.through(queue)
    log_floors(parent, spec)
    context, started_here = join_ray(address)
    result = SweepResult(spec, parent.run_id, tracking_uri)
    status = "FAILED"
    log = DriverLog(parent)
    log.queue = queue
    try:
        with process.redirect_output(log.tee):
            try:
                print_monitoring(context, tracking_uri, parent.experiment_id)
                _run_stages(spec, result, storage, rerun, log)
                _log_best(parent, spec, result.stages[-1].rows)
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                print(
                    f"sweep {spec.name} stopped; its state is saved: the same `ttt sweep run` "
                    "resumes it",
                    file=sys.stderr,
                )
                raise
    finally:
        log.close()
        _close_runs(parent, status, ended_runs(log))
        queue.close(DRAIN_TIMEOUT)  # then what is left is named, and sent by the next run
        if started_here:
            ray.shutdown()
    return result


def driver_process(spec: SweepSpec) -> None:
    """What a sweep's driver sets for the libraries in its process, before any Tuner:
    Ray's environment, trial-named actors, Tune's advice filtered, and with Optuna,
    Tune's metric check off (it would refuse the in-between reports that lack the
    searcher's metric)."""
    process.ray_env()
    process.tracking_env()
    name_trial_actors(trial_entry)  # trial-named actors in the dashboard and log lines
    process.add_log_filter("ray.tune.tune", _TuneResumeAdvice())
    if spec.search_alg == "optuna":
        process.set_env("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


def _run_stages(spec: SweepSpec, result: SweepResult, storage: str, rerun: Rerun, log) -> None:
    """The grid (stage `main`), then each stage from the grid's finished trials."""

    def callback(stage: str, role: str) -> MlflowSweepCallback:
        cb = MlflowSweepCallback(
            result.tracking_uri, spec.name, result.parent_run_id, stage,
            functools.partial(flat_params, spec), role, spec.metric, spec.mode,
            str(sweep_queue_folder(storage, spec.name)),
        )  # fmt: skip
        cb.driver_log, cb.queue = log, log.queue  # not pickled: the driver's own
        log.callbacks.append(cb)
        return cb

    max_steps = spec.config(spec.points[0], {}).train.steps
    space = {
        # Optuna samples every trial itself and refuses grid_search; its spec has one
        # point (load_spec), which is then a constant.
        "point": spec.points[0] if spec.search_alg == "optuna" else tune.grid_search(spec.points),
        "sample": {k: _domain(kind, args) for k, (kind, args) in spec.random.items()},
    }
    cb = callback("main", "eval" if spec.task == "eval" else "trial")
    say_if_waiting(spec)
    grid = fit(_tuner(spec, spec.name, space, cb, storage, max_steps, rerun))
    result.stages.append(StageResult("main", _rows(grid, spec)))
    for stage in spec.stages:
        starts = _starts(spec, stage, result.stages[0].rows)  # every stage extends the first
        if not starts:
            print(f"stage {stage.name}: no finished trial to start from", file=sys.stderr)
            break
        space = {"start": tune.grid_search(starts), "stage": stage.name}
        steps = stage.steps or max_steps
        tuner = _tuner(spec, f"{spec.name}-{stage.name}", space, callback(stage.name, "trial"),
                       storage, steps, rerun)  # fmt: skip
        result.stages.append(StageResult(stage.name, _rows(fit(tuner), spec)))


class DriverLog:
    """The driver's output (its own lines and the trials' progress lines Ray forwards to
    it) copied to a file that goes up to the parent run as `driver/driver-<start>.log`
    whenever a trial starts or ends, and at the end: a sweep's log stays one click away
    after its Ray cluster, and with it the dashboard's copy, is gone."""

    def __init__(self, parent: MlflowRun):
        self.parent = parent
        self.callbacks: list = []  # the stages' MlflowSweepCallbacks, which upload it
        self.queue = None  # the sweep's tracking queue (ttt.tracking.queue.WriteQueue)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path = Path(tempfile.mkdtemp(prefix="ttt-driver-")) / f"driver-{stamp}.log"
        self.file = self.path.open("a", buffering=1)

    def tee(self, stream) -> _Tee:
        """`stream`, with what is written to it also written to the log file (for
        `process.redirect_output`)."""
        return _Tee(stream, self.file)

    def upload(self, via: MlflowRun | None = None) -> None:
        """`via`: the parent as the trials' callback holds it, writing through its queue."""
        try:
            self.file.flush()
            (via or self.parent).log_artifact(self.path, "driver")
        except Exception as e:  # a store that is briefly away: the next upload has it all
            print(f"(driver log not uploaded: {type(e).__name__})", file=sys.__stderr__)

    def close(self) -> None:
        self.upload()
        self.file.close()


# Tune's advice that does not apply to `ttt` users: TensorBoard (the runs are in MLflow).
NOISE = ("tensorboard --logdir",)
# Terminal escapes (Ray's and Tune's colours, cursor moves): the terminal gets them, the
# log file (MLflow's artifact, read in a browser) does not.
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file
        self.dropped = False  # print() writes a line's newline apart: drop it with the line

    def write(self, text: str) -> int:
        if any(n in text for n in NOISE) or (self.dropped and text == "\n"):
            self.dropped = not self.dropped
            return len(text)
        self.dropped = False
        self.file.write(ANSI.sub("", text))
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding: the terminal's
        return getattr(self.stream, name)


def _log_best(parent: MlflowRun, spec: SweepSpec, rows: list[dict]) -> None:
    """The best trial of the last stage, on the parent run: its metric, and a tag with its
    MLflow run id and the UI's path to it."""
    done = [r for r in rows if r.get(spec.metric) is not None]
    if not done:
        return
    best = (min if spec.mode == "min" else max)(done, key=lambda r: r[spec.metric])
    parent.log_summary({f"best_{spec.metric}": best[spec.metric]})
    exp = parent.experiment_id
    try:
        run = find_run(parent.c, exp, {TAG.TRIAL_ID: best["trial"]}) if best["trial"] else None
    except Exception as e:  # the server away at the end: the metric is queued, not the link
        print(f"best trial not linked on the parent run: {type(e).__name__}", file=sys.stderr)
        return
    if run is not None:
        link = run_link(parent.c.tracking_uri, exp, run.info.run_id)
        parent.set_tags(
            {
                TAG.BEST_RUN_ID: run.info.run_id,
                TAG.BEST_RUN: link,
                "mlflow.note.content": f"**Sweep {spec.name}** ended. Best trial: "
                f"[{run.info.run_name}]({link}), {spec.metric} {best[spec.metric]:.4f}",
            }
        )


def _same_sweep(spec: SweepSpec, parent) -> None:
    """A re-run resumes only the sweep it started: an edited spec (or other overrides)
    under the same name would silently keep the old trials."""
    stored = parent.data.tags.get(TAG.SPEC_DIGEST)
    if stored is not None and stored != spec.digest():
        was = parent.data.tags.get(TAG.OVERRIDES, "")
        raise UserError(
            f"sweep {spec.name!r}: {spec.path} or its overrides changed since it started "
            f"(overrides then: {was or 'none'}); give --name NEW for a new sweep, or restore "
            "the spec to resume this one (--resume-errored / --restart-errored rerun its "
            "failed trials)"
        )


def connect_env(address: str, timeout: float = 5.0) -> None:
    """Before `ray.init(address=...)`: fail in seconds when nothing listens there, and use
    the cluster's token when one is at hand (Ray >= 2.59 turns token auth on for
    `ray start --head`; a driver with auth off is refused after ~20 s of retries)."""

    host, _, port = address.rpartition(":")
    if host in ("127.0.0.1", "localhost") and loopback_only(int(port)):
        loopback_mode()  # a cluster on this machine only, as `ttt sweep run` starts
    if address != "auto" and not address.startswith("ray://"):
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                pass
        except (OSError, ValueError):
            raise UserError(
                f"--address={address}: no Ray cluster listens there (start one with "
                "`ray start --head`, and pass its GCS address HOST:PORT, default port 6379)"
            ) from None
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user said how this cluster authenticates
    if token_source() is None:  # someone else's cluster: no token is invented for it
        raise UserError(
            f"--address={address}: no Ray auth token here; set RAY_AUTH_TOKEN (on the head "
            "node `ray get-auth-token` prints it) or copy its ~/.ray/auth_token, or set "
            "RAY_AUTH_MODE=disabled for a cluster started with auth off"
        )
    token_auth()


def init_error(address: str, e: Exception) -> UserError:
    text = str(e)
    if "uthentication" in text or "auth" in text.lower():
        return UserError(
            f"--address={address}: the cluster wants a token: set RAY_AUTH_TOKEN (on the head "
            "node, `ray get-auth-token` prints it) or copy the head's ~/.ray/auth_token here"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return UserError(f"--address={address}: could not join the Ray cluster: {first}")


def ended_runs(log: DriverLog) -> set[str]:
    """The MLflow runs the stages' callbacks ended (their `_done`)."""
    return {run_id for cb in log.callbacks for run_id in cb.ended()}


def _close_runs(parent: MlflowRun, status: str, ended: set[str] = frozenset()) -> None:
    """Nothing stays RUNNING after the driver ends: an interrupted trial's run is marked
    KILLED (a resume sets it running again). `ended`: runs whose end the callbacks have
    written, perhaps still in the tracking queue (not interrupted, only not yet sent)."""
    try:
        children = parent.c.search_runs(
            [parent.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' "
            "and attributes.status = 'RUNNING'",
        )
    except Exception as e:  # the server away: the next run of the sweep closes them
        print(f"trial runs left RUNNING not closed: {type(e).__name__}", file=sys.stderr)
        children = []
    for run in children:
        if run.info.run_id not in ended:
            MlflowRun(parent.c, run.info.run_id, parent.experiment_id).finish("interrupted")
    parent.end(status)
