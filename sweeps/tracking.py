"""MLflow tracking of a sweep: one writer, on the driver.

A Ray Tune callback turns trial events into MLflow calls, so concurrent trials never
share a SQLite file (no `database is locked`) and a remote tracking server sees one
client. Layout: one experiment per sweep, a parent run for the sweep, one child run per
trial (tag `mlflow.parentRunId`), found again by its `ttt.trial_id` tag on resume so a
resumed trial never gets a second run.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ray.tune import Callback

from sweeps.spec import TrialStart
from ttt import tags as TAG
from ttt.tracking import MlflowRun, log_eval_artifacts, run_link, run_tags
from ttt.tracking.queue import WriteQueue
from ttt.tracking.tracker import EVAL_PREFIXES, apply_record, described
from ttt.tracking.views import RUN_COLOR_TAG, TRIALS_VIEW, run_color

# How long the end of a stage waits for records the server has not taken yet.
DRAIN_TIMEOUT = 120.0


def short_name(config: dict) -> str:
    """A trial's MLflow run name: its swept values, the mixer first and bare, so that names
    differ in their first characters where the UI cuts them (`ttt_e2e inner_lr=0.3`)."""

    start = TrialStart.of(config)
    values = {**start.point, **start.sample}
    ordered = sorted(values.items(), key=lambda kv: kv[0] != "model.mixer")
    parts = [
        str(v)
        if k == "model.mixer"
        else f"{k.split('.')[-1]}={v:.3g}"
        if isinstance(v, float)
        else f"{k.split('.')[-1]}={v}"
        for k, v in ordered
    ]
    if start.stage:
        parts.insert(0, start.stage)
    return " ".join(parts) or "trial"


def trial_counts(trials, changed=None, as_state: str = "") -> dict[str, int]:
    """Tune's trials by state, with `changed` counted as `as_state`: Tune calls a
    callback's `on_trial_start` before it marks the trial RUNNING, and its
    `on_trial_complete` and `on_trial_error` before it marks the trial ended."""
    counts = {"finished": 0, "running": 0, "failed": 0, "pending": 0}
    key = {"TERMINATED": "finished", "RUNNING": "running", "ERROR": "failed"}
    for t in trials:
        counts[as_state if t is changed else key.get(t.status, "pending")] += 1
    return counts


def trial_index(trial) -> int:
    """The trial's number in its Tune experiment (its id ends in `_00003`)."""
    tail = trial.trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class MlflowSweepCallback(Callback):
    """Logs every trial of one sweep stage. Picklable (Tune stores it with the run config):
    the client and caches are rebuilt after a restore."""

    def __init__(
        self,
        tracking_uri: str,
        sweep: str,
        parent_run_id: str,
        stage: str,
        params_of,
        role: str = "trial",
        metric: str = "eval_loss",
        mode: str = "min",
        queue_folder: str | None = None,
    ):
        self.tracking_uri, self.sweep, self.stage = tracking_uri, sweep, stage
        self.role = role  # trial, or eval for a `task: eval` sweep
        self.metric, self.mode = metric, mode  # what "best" means on the parent run
        self.parent_run_id = parent_run_id
        self.params_of = params_of  # trial.config -> flat config dict
        # where the queue of writes spools while the server is away (None: written at once)
        self.queue_folder = queue_folder
        self._reset()

    def _reset(self):
        self._queue: WriteQueue | None = None
        self._parent: MlflowRun | None = None
        self._runs: dict[str, MlflowRun] = {}  # trial_id -> its run
        self._done: set[str] = set()  # run ids already finished
        self._nodes: dict[str, list[str]] = {}  # run_id -> node ids, in order
        self._retries: dict[str, int] = {}  # run_id -> Tune's retries, as MLflow has them
        self._mfu_described: set[str] = set()  # run ids whose description names `mfu`

    def __getstate__(self):
        state = dict(self.__dict__)
        drop = ("_queue", "_parent", "_runs", "_done", "_nodes", "_retries", "_mfu_described",
                "driver_log", "queue")  # fmt: skip
        for key in drop:
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def parent(self) -> MlflowRun:
        if self._parent is None:
            self._parent = self._through(MlflowRun.attach(self.tracking_uri, self.parent_run_id))
        return self._parent

    def _through(self, run: MlflowRun) -> MlflowRun:
        """Every write of a run that is open goes through one queue, on its own thread, so
        Tune's loop never waits on the server (`ttt.tracking.queue`)."""
        shared = getattr(self, "queue", None)  # the driver's, set beside driver_log
        if shared is not None:
            return run.through(shared)
        folder = getattr(self, "queue_folder", None)  # a callback restored from older state
        if folder is None:
            return run
        if self._queue is None:
            send = functools.partial(apply_record, run.c)
            self._queue = WriteQueue(send, Path(folder), self.tracking_uri)
        return run.through(self._queue)

    def close_queue(self, timeout: float = DRAIN_TIMEOUT) -> int:
        """Drain the writes for at most `timeout` s; returns how many are left (kept on
        disk, named in one line, sent first by the next queue on the folder)."""
        if self._queue is None:
            return 0
        left = self._queue.close(timeout)
        self._queue = None
        self._parent = None
        self._runs.clear()  # `_done` stays: the driver's end asks which runs were ended
        return left

    def on_experiment_end(self, trials, **info):
        self.close_queue()  # its own queue; the driver's is closed at the sweep's end

    def ended(self) -> set[str]:
        """The runs this callback ended (FINISHED, FAILED or KILLED as their outcome)."""
        return set(self._done)

    def experiment_id(self) -> str:
        return self.parent.experiment_id

    def run(self, trial) -> MlflowRun:
        """The trial's child run: found by tag after a restore, created otherwise."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        run = MlflowRun.open(
            self.tracking_uri,
            None,
            {TAG.TRIAL_ID: trial.trial_id},
            experiment_id=self.experiment_id(),
            name=short_name(trial.config),
            tags={
                **run_tags(self.role, f"ttt sweep run ({self.sweep}, stage {self.stage})"),
                RUN_COLOR_TAG: run_color(trial_index(trial)),  # MLflow's own can collide
                TAG.SWEEP: self.sweep,
                TAG.STAGE: self.stage,
                TAG.RUN_DIR: str(trial.path),
            },
            params=self.params_of(trial.config),
            parent_id=self.parent_run_id,
            reopen=False,
        )
        self._through(run)
        if run.found is not None:
            self._nodes[run.run_id] = [n for n in run.tags.get(TAG.NODE_IDS, "").split(",") if n]
            self._retries[run.run_id] = int(run.tags.get(TAG.RETRIES, "0"))
            if run.tags.get(TAG.OUTCOME) == "finished":
                self._done.add(run.run_id)  # Tune may restart it; MLflow already has it all
            else:
                run.reopen()
        self._runs[trial.trial_id] = run
        return run

    def run_id(self, trial) -> str:
        return self.run(trial).run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run = self.run(trial)
        run.set_tags({TAG.TRIAL_NAME: str(trial)})
        link = run_link(self.tracking_uri, self.experiment_id(), run.run_id)
        print(f"trial {trial} (Ray trial {trial.trial_id}): MLflow {link}", flush=True)
        self._update_parent(trials, trial, "running")

    def _update_parent(self, trials, changed=None, as_state: str = "") -> None:
        """The parent run as a sweep's summary while it runs: how many trials finished,
        run and failed (metrics, one point per change), the best result so far, and its
        description with a link to the best trial's run (the UI renders it as Markdown)."""
        counts = trial_counts(trials, changed, as_state)
        # x: trials ended so far (monotone across a driver restart, unlike a call count)
        step = counts["finished"] + counts["failed"]
        metric = getattr(self, "metric", "eval_loss")  # a callback restored from older state
        metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
        done = [
            t
            for t in trials
            if (t.status == "TERMINATED" or (t is changed and as_state == "finished"))
            and (t.last_result or {}).get(metric) is not None
        ]
        curves = run_link(self.tracking_uri, self.experiment_id(), view=TRIALS_VIEW, charts=True)
        lines = [
            f"**Sweep {self.sweep}**, stage {self.stage}: "
            + ", ".join(f"{v} {k}" for k, v in counts.items()),
            f"[The trials side by side]({curves}): their loss and eval_loss curves, what "
            "differs between them, and (table view) their swept values and losses",
        ]
        if done:
            pick = min if getattr(self, "mode", "min") == "min" else max
            best = pick(done, key=lambda t: t.last_result[metric])
            value = float(best.last_result[metric])
            metrics[f"best_{metric}_so_far"] = value
            link = run_link(self.tracking_uri, self.experiment_id(), self.run_id(best))
            lines.append(
                f"Best trial so far: [{short_name(best.config)}]({link}), {metric} "
                f"{value:.4f} at step {best.last_result.get('step', '?')}"
            )
        self.parent.log_summary(metrics, step)
        self.parent.set_tags({"mlflow.note.content": "\n\n".join(lines)})
        log = getattr(self, "driver_log", None)  # set by the driver; not pickled
        if log is not None:
            log.upload(self.parent)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self.run(trial)
        if result.get("provenance") and run.run_id not in self._done:
            # the trial's code, JAX and devices, in its first report of each attempt
            tags = json.loads(result["provenance"])
            if result.get("flops_per_token") is not None:
                tags[TAG.FLOPS_PER_TOKEN] = f"{result['flops_per_token']:.6g}"
            run.set_tags(tags)
        step = int(result.get("step", result.get("training_iteration", 0)))
        if run.run_id in self._done or step <= run.last_step:
            return  # already logged before the driver restarted
        eval_step = result.get("eval_step")
        if eval_step is not None and eval_step != step:  # an evaluation made before `step`
            evaluated = {k for k in result if k == "eval_loss" or k.startswith(EVAL_PREFIXES)}
            run.log_summary({k: result[k] for k in evaluated}, eval_step)
            result = {k: v for k, v in result.items() if k not in evaluated}
        run.log(result, step)
        tags = {}
        if run.run_id not in self._mfu_described and (note := described(result)):
            tags.update(note)  # the description's `mfu` line, now that it is logged
            self._mfu_described.add(run.run_id)
        if result.get("node_id"):
            tags[TAG.NODE_ID] = result["node_id"]
            if result.get("node_ip"):
                tags[TAG.NODE_IP] = result["node_ip"]
            seen = self._nodes.setdefault(run.run_id, [])
            if result["node_id"] not in seen:  # every node the trial ran on, in order
                seen.append(result["node_id"])
                tags[TAG.NODE_IDS] = ",".join(seen)
                # JAX processes of this attempt (> 1 for a multi-node trial)
                tags[TAG.PROCESSES] = str(result.get("processes", 1))
        if result.get("start_step"):  # this attempt continued from a checkpoint
            tags[TAG.RESUMED_FROM] = str(result["start_step"])
        run.set_tags(tags)

    def _log_eval(self, trial, run: MlflowRun) -> None:
        """The final checkpoint carries the eval outputs (per-token NLL Parquet)."""
        ckpt = trial.checkpoint
        if ckpt is None:
            return
        from analysis.run_figures import (
            eval_figure_files,  # deferred: Matplotlib loads only when a trial's figures are drawn
        )

        with ckpt.as_directory() as d:
            params = self.params_of(trial.config)
            log_eval_artifacts(run, Path(d), eval_figure_files, params, short_name(trial.config))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.run(trial).set_tags({TAG.CHECKPOINT: checkpoint.path})

    def _finish(self, trial, outcome: str, message: str = "") -> None:
        run = self.run(trial)
        if run.run_id in self._done:
            return
        self._done.add(run.run_id)
        run.finish(outcome, message)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        outcome = last.get("outcome") or "early_stopped"
        run = self.run(trial)
        if outcome == "finished" and run.run_id not in self._done:
            self._log_eval(trial, run)
            if "eval_loss" in last:
                run.log_summary({"final_eval_loss": last["eval_loss"]}, int(last.get("step", 0)))
        self._finish(trial, outcome, last.get("message", ""))
        self._update_parent(trials, trial, "finished")

    def on_trial_recover(self, iteration, trials, trial, **info):
        run = self.run(trial)  # counted here: no read of the server while writes queue
        retries = self._retries.get(run.run_id, 0) + 1
        self._retries[run.run_id] = retries
        run.set_tags({TAG.RETRIES: str(retries)})

    def on_trial_error(self, iteration, trials, trial, **info):
        error = ""
        path = getattr(trial, "error_file", None)
        if path and os.path.exists(path):
            error = Path(path).read_text().strip().splitlines()[-1]
        self._finish(trial, "error", error)
        self._update_parent(trials, trial, "failed")
