"""One sweep trial: a Ray Tune function trainable that calls `ttt.train.run` in-process.

The trial's run directory is rebuilt from Tune's checkpoint on every (re)start, so Tune's
checkpoint is the single source of truth: a retried or resumed trial continues from it,
and one that has none starts from scratch.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path

import jax
import ray
from ray import tune
from ray.util.metrics import Gauge
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sweeps.spec import SweepSpec, TrialStart
from ttt import process
from ttt.errors import StorageError, writing
from ttt.evaluation import measure
from ttt.evaluation.weights import load_weights
from ttt.rundir import RECORD_FILES, RunDir
from ttt.tracking import SystemSampler, provenance
from ttt.train import run
from ttt.train.distributed import initialize

FINAL = "final.json"


def _stage_checkpoint(run_dir: Path, step: int, final: dict | None) -> Path:
    """A self-contained copy of the run at `step`, for Tune to persist. The final one
    carries the last report, so a trial Tune restarts after it finished (its state was
    saved before the finish) reports again instead of training again."""
    stage = Path(tempfile.mkdtemp(prefix=f"ckpt-{step}-"))
    if final is not None:
        (stage / FINAL).write_text(json.dumps(final))
    run, copy = RunDir(run_dir), RunDir(stage)
    for name in RECORD_FILES:
        if (run.path / name).exists():
            shutil.copy2(run.path / name, copy.path / name)
    if run.eval_dir.is_dir():
        shutil.copytree(run.eval_dir, copy.eval_dir)
    shutil.copytree(run.checkpoint(step), copy.checkpoint(step))
    return stage


class Peer:
    """JAX process `rank` (> 0) of a multi-node trial, in its own placement-group bundle.

    It trains in lockstep with process 0 (the trial itself) and keeps no files: process 0
    holds the checkpoints and reports, and hands the start state to the others.
    """

    def run(self, start: TrialStart, spec: SweepSpec, coordinator: str, rank: int) -> str:
        process.trial_env(spec.resources["gpu"])

        initialize(coordinator, int(spec.resources["nodes"]), rank)
        with tempfile.TemporaryDirectory(prefix=f"ttt-peer{rank}-") as d:
            return run(start.config(spec), Path(d) / "run", progress=False).status


def _start_peers(start: TrialStart, spec: SweepSpec) -> tuple[str, list]:
    """Start processes 1..N-1 in the trial's other bundles; returns (coordinator, refs).
    Process 0's node hosts the jax.distributed coordinator."""

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        coordinator = f"{host}:{s.getsockname()[1]}"
    pg = get_current_placement_group()
    peer = ray.remote(Peer)
    refs = []
    for rank in range(1, int(spec.resources["nodes"])):
        actor = peer.options(
            num_cpus=spec.resources["cpu"],
            num_gpus=spec.resources["gpu"],
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank
            ),
        ).remote()
        refs.append(actor.run.remote(start, spec, coordinator, rank))
    return coordinator, refs


def _evaluate(cfg, run_dir: Path, extras: dict) -> None:
    """A `task: eval` trial: evaluate `train.init_from`'s weights, report once, with the
    per-position NLL in the checkpoint (as a training trial's final report has it)."""

    run = load_weights(cfg, cfg.train.init_from, key="train.init_from")
    result, summary = measure.loss(run, RunDir(run_dir).nll_table())
    report = {"eval_loss": result.loss, "step": summary["step"], "outcome": "finished", **extras}
    stage = Path(tempfile.mkdtemp(prefix="eval-"))
    try:
        (stage / FINAL).write_text(json.dumps(report))
        shutil.copytree(RunDir(run_dir).eval_dir, RunDir(stage).eval_dir)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(stage))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class Progress:
    """Each report as one line in the trial's log (the driver's, the Ray job's and the
    dashboard's logs show it, under the trial's name) and as Ray gauges tagged with the
    trial (the dashboard's Metrics view shows them when Prometheus is set up)."""

    KEYS = ("step", "loss", "eval_loss", "tokens_per_s")

    def __init__(self, trial: str, experiment: str, steps: int):

        self.trial, self.steps = trial, steps
        self.tags = {"trial": trial, "sweep": experiment}
        self.gauges = {
            k: Gauge(f"ttt_trial_{k}", description=UNITS[k], tag_keys=("trial", "sweep"))
            for k in self.KEYS
        }

    def show(self, result: dict) -> None:
        for k, gauge in self.gauges.items():
            if isinstance(result.get(k), (int, float)):
                gauge.set(float(result[k]), tags=self.tags)
        parts = [f"step {result['step']}/{self.steps}"]
        if "loss" in result:
            parts.append(f"loss {result['loss']:.4f}")
        if "eval_loss" in result:
            parts.append(f"eval_loss {result['eval_loss']:.4f}")
        if "tokens_per_s" in result:
            parts.append(f"{result['tokens_per_s']:.0f} tok/s")
        print("  ".join(parts), flush=True)  # Ray prefixes it with the trial's name


UNITS = {
    "step": "optimizer steps done",
    "loss": "training loss, nats per token",
    "eval_loss": "validation loss, nats per token",
    "tokens_per_s": "training tokens per second",
}


class TuneReporter:
    """A `ttt.train.Reporter` that reports to Tune: each report with the trial's extras
    (node, processes, provenance once, system metrics), shown as a progress line; a
    checkpointed step with a self-contained copy of the run for Tune to persist."""

    def __init__(self, run_dir: Path, progress: Progress, extras):
        self.run_dir, self.progress, self.extras = run_dir, progress, extras
        self.pending: dict = {}  # an evaluation rides on the next report, at its step

    def report(self, step: int, values: dict) -> dict:
        result = {**self.pending, **values, "step": step, **self.extras()}
        self.pending = {}
        self.progress.show(result)
        return result

    def evaluation(self, step, result) -> None:
        self.pending = {**result.metrics, "eval_step": step}

    def metrics(self, step, values) -> None:

        tune.report(self.report(step, values))

    def checkpoint(self, step, directory, values, final=False) -> None:

        result = self.report(step, values)
        if final:
            result["outcome"] = "finished"
        stage_dir = None
        try:
            with writing(f"the Tune checkpoint of step {step}", Path(tempfile.gettempdir())):
                stage_dir = _stage_checkpoint(self.run_dir, step, result if final else None)
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(stage_dir))
        finally:
            if stage_dir is not None:
                shutil.rmtree(stage_dir, ignore_errors=True)


def _scratch_run_dir() -> Path:
    """The trial's run directory, rebuilt from Tune's checkpoint (empty without one), in
    node-local scratch outside Tune's trial folder (which Tune syncs to storage as driver
    artifacts): Tune's checkpoints are what persists."""

    ctx = tune.get_context()
    run_dir = (
        Path(tempfile.gettempdir())
        / "ttt-trials"
        / ctx.get_experiment_name()
        / ctx.get_trial_id()
        / "run"
    )
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, run_dir)
        add_older_checkpoints(run_dir, older_tune_checkpoints(checkpoint))
    return run_dir


def older_tune_checkpoints(checkpoint) -> list[Path]:
    """The trial's other Tune checkpoints kept beside the latest (`num_to_keep`), newest
    first, where they are on a local filesystem (a cloud store keeps only the latest in
    reach: the trial then has no older one to fall back to)."""
    import pyarrow.fs  # deferred: like Ray, loaded only in a trial's worker

    if not isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return []
    latest = Path(checkpoint.path)
    return sorted(
        (p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p != latest),
        reverse=True,
    )


def add_older_checkpoints(run_dir: Path, older: list[Path]) -> None:
    """The Orbax checkpoints of older Tune checkpoints, beside the latest one's in the
    rebuilt run directory: if the latest cannot be read, the run resumes from the newest
    one that can (`ttt.train.checkpoint.read_first_readable`), as `ttt train` does."""
    run = RunDir(run_dir)
    for tune_dir in older:
        kept = RunDir(tune_dir)
        for step in sorted(int(p.name) for p in kept.checkpoints.glob("*") if p.name.isdigit()):
            if not run.checkpoint(step).exists():
                shutil.copytree(kept.checkpoint(step), run.checkpoint(step))


def _extras(spec: SweepSpec, start_step: int):
    """What each of this attempt's reports carries besides the loop's metrics: where it
    runs, and once (when JAX and jax.distributed are up) its provenance."""

    tags = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "start_step": start_step,
    }
    sampler = SystemSampler() if spec.system_metrics else None
    sent = []

    def extras() -> dict:
        out = {**tags, "processes": jax.process_count()}
        if not sent:
            out["provenance"] = json.dumps(provenance())
            sent.append(True)
        return {**out, **(sampler.read() if sampler else {})}

    return extras


def storage_failure_report(e: StorageError, node_id: str) -> dict:
    """The last report of a trial whose disk refused a write: the driver's callback ends
    its MLflow run FAILED with `ttt.outcome=error` and the line as `ttt.message`."""
    return {"outcome": "error", "message": str(e), "node_id": node_id}


def trial_main(start: TrialStart, spec: SweepSpec) -> None:
    process.trial_env(spec.resources["gpu"])
    process.quiet_checkpoint_errors()

    cfg = start.config(spec)
    run_dir = _scratch_run_dir()
    extras = _extras(spec, RunDir(run_dir).latest_step() or 0)
    ctx = tune.get_context()
    progress = Progress(ctx.get_trial_name(), ctx.get_experiment_name(), cfg.train.steps)
    try:
        if (run_dir / FINAL).exists():
            tune.report(json.loads((run_dir / FINAL).read_text()))
            return
        if spec.task == "eval":
            _evaluate(cfg, run_dir, extras())
            return
        peers = []
        if spec.resources["nodes"] > 1:
            coordinator, peers = _start_peers(start, spec)
            initialize(coordinator, int(spec.resources["nodes"]), 0)
        try:
            reporter = TuneReporter(run_dir, progress, extras)
            result = run(cfg, run_dir, reporter=reporter, progress=False)
        except StorageError as e:
            # A full (or read-only) disk is not fixed by trying again: the trial ends as an
            # error with the line, once, instead of burning through Tune's retries.
            print(f"error: {e}", flush=True)
            tune.report(storage_failure_report(e, ray.get_runtime_context().get_node_id()))
            return
        ray.get(peers)  # a peer's error fails the trial too
        if result.status == "diverged":
            tune.report(
                {
                    "outcome": "diverged",
                    "step": result.step,
                    "message": result.message,
                    "node_id": ray.get_runtime_context().get_node_id(),
                }
            )
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
