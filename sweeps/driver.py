"""`ttt sweep run`: a sweep spec as Ray Tune trials, tracked in MLflow.

Re-running the same command resumes: each stage's Tune experiment is restored from its
storage folder (finished trials stay finished, unfinished ones continue from their last
checkpoint), and the MLflow parent and child runs are found again by their tags.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sweeps.spec import Stage, SweepSpec
from sweeps.tracking import (
    MlflowSweepCallback,
    client,
    default_tracking_uri,
    ensure_experiment,
    find_run,
)

DEFAULT_STORAGE = "ray_results"


def flat_params(spec: SweepSpec, trial_config: dict) -> dict:
    """The resolved config of a trial, flattened: the child run's MLflow params."""
    start = trial_config.get("start") or trial_config
    sample = dict(start.get("sample") or trial_config.get("sample") or {})
    if start.get("init_from"):
        sample["train.init_from"] = start["init_from"]
    stage = next((s for s in spec.stages if s.name == trial_config.get("stage")), None)
    return spec.config(start["point"], sample, stage).flat()


def trial_entry(config: dict, spec: SweepSpec) -> None:
    """Tune's trainable (module level, so that a restore finds it under the same name)."""
    from sweeps.trial import trial_main

    start = config.get("start")
    if start is not None:
        config = {**start, "stage": config.get("stage")}
    trial_main(config, spec)


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
    cfg = trial.config.get("start") or trial.config
    parts = [f"{k.split('.')[-1]}={v}" for k, v in (cfg.get("point") or {}).items()]
    if trial.config.get("stage"):
        parts.insert(0, trial.config["stage"])
    return "_".join([*parts, trial.trial_id])[:120] or trial.trial_id


def trial_dirname(trial) -> str:
    return trial.trial_id


def _domain(kind: str, args: list):
    from ray import tune

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
    from ray.tune.schedulers import ASHAScheduler

    # Rung decisions need a metric in every report: the training loss (eval comes at the end).
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
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        from ttt.errors import UserError

        raise UserError(
            f"{spec.path}: search_alg: optuna is not installed (pip install optuna), or use basic"
        ) from None
    return OptunaSearch(metric=spec.metric, mode=spec.mode)


def trial_resources(spec: SweepSpec):
    """One node's share, or for `nodes: N` a placement group of N bundles on N distinct
    nodes: the trial itself runs in the first bundle as JAX process 0 and places one
    peer process in each other bundle (sweeps/trial.py)."""
    from ray import tune

    cpu, gpu, nodes = spec.resources["cpu"], spec.resources["gpu"], spec.resources["nodes"]
    if nodes == 1:
        return {"cpu": cpu, "gpu": gpu}
    bundle = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return tune.PlacementGroupFactory([bundle] * nodes, strategy="STRICT_SPREAD")


def _tuner(spec: SweepSpec, name: str, param_space: dict, callback, storage: Path, max_steps: int):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(trial_entry, spec=spec), trial_resources(spec)
    )
    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        print(f"resuming {path}", file=sys.stderr)
        return tune.Tuner.restore(
            str(path),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
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
            storage_path=str(storage),
            callbacks=[callback],
            stop={"time_total_s": spec.stop_time_s} if spec.stop_time_s else None,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=int(os.environ.get("TTT_TUNE_VERBOSE", "1")),
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
    starts = []
    for r in done:
        cfg = r["config"].get("start") or r["config"]
        starts.append(
            {
                "point": cfg["point"],
                "sample": cfg.get("sample") or {},
                "init_from": r["checkpoint"].path,
            }
        )
    return starts


def print_monitoring(context, tracking_uri: str) -> None:
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url}", file=sys.stderr)
        print(
            "  token auth is on for local clusters (Ray >= 2.59): `ray get-auth-token` "
            "prints the token to paste in the browser; API clients send "
            "'Authorization: Bearer <token>'",
            file=sys.stderr,
        )
    print(
        f"MLflow: ttt ui --tracking-uri {tracking_uri}   (serves http://127.0.0.1:5000)",
        file=sys.stderr,
    )


def run_sweep(
    spec: SweepSpec,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage_path: str | None = None,
) -> SweepResult:
    import ray
    from ray import tune

    tracking_uri = tracking_uri or default_tracking_uri()
    storage = Path(storage_path or spec.storage_path or DEFAULT_STORAGE).absolute()
    c = client(tracking_uri)
    exp_id = ensure_experiment(c, spec.name, tracking_uri)
    parent = find_run(c, exp_id, {"ttt.role": "sweep", "ttt.sweep": spec.name})
    if parent is None:
        parent = c.create_run(
            exp_id,
            run_name=spec.name,
            tags={
                "ttt.role": "sweep",
                "ttt.sweep": spec.name,
                "ttt.spec": str(Path(spec.path).absolute()),
                "ttt.storage_path": str(storage),
            },
        )
        c.log_artifact(parent.info.run_id, spec.path, artifact_path="spec")
    else:
        c.update_run(parent.info.run_id, status="RUNNING")
    parent_id = parent.info.run_id

    started_here = not ray.is_initialized() and address is None
    if not ray.is_initialized():
        kwargs = (
            {"include_dashboard": True, "dashboard_host": "127.0.0.1"} if address is None else {}
        )
        context = ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        context = ray.get_runtime_context()
    print_monitoring(context, tracking_uri)

    result = SweepResult(spec, parent_id, tracking_uri)
    status = "FAILED"
    try:
        max_steps = spec.config(spec.points[0], {}).train.steps
        space = {
            "point": tune.grid_search(spec.points),
            "sample": {k: _domain(kind, args) for k, (kind, args) in spec.random.items()},
        }
        params_of = functools.partial(flat_params, spec)
        cb = MlflowSweepCallback(tracking_uri, spec.name, parent_id, "main", params_of)
        grid = _tuner(spec, spec.name, space, cb, storage, max_steps).fit()
        result.stages.append(StageResult("main", _rows(grid, spec)))
        for stage in spec.stages:
            starts = _starts(spec, stage, result.stages[0].rows)  # every stage extends the first
            if not starts:
                print(f"stage {stage.name}: no finished trial to start from", file=sys.stderr)
                break
            space = {"start": tune.grid_search(starts), "stage": stage.name}
            cb = MlflowSweepCallback(tracking_uri, spec.name, parent_id, stage.name, params_of)
            steps = stage.steps or max_steps
            grid = _tuner(spec, f"{spec.name}-{stage.name}", space, cb, storage, steps).fit()
            result.stages.append(StageResult(stage.name, _rows(grid, spec)))
        done = [r for r in result.stages[-1].rows if r.get(spec.metric) is not None]
        if done:
            pick = min if spec.mode == "min" else max
            c.log_metric(
                parent_id, f"best_{spec.metric}", float(pick(r[spec.metric] for r in done))
            )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _close_runs(c, exp_id, parent_id, status)
        if started_here:
            ray.shutdown()
    return result


def _close_runs(c, exp_id: str, parent_id: str, status: str) -> None:
    """Nothing stays RUNNING after the driver ends: an interrupted trial's run is marked
    KILLED (a resume sets it running again)."""
    children = c.search_runs(
        [exp_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
        "and attributes.status = 'RUNNING'",
    )
    for run in children:
        c.set_tag(run.info.run_id, "ttt.outcome", "interrupted")
        c.set_terminated(run.info.run_id, status="KILLED")
    c.set_terminated(parent_id, status=status)
