"""MLflow tracking of a sweep: one writer, on the driver.

A Ray Tune callback turns trial events into MLflow calls, so concurrent trials never
share a SQLite file (no `database is locked`) and a remote tracking server sees one
client. Layout: one experiment per sweep, a parent run for the sweep, one child run per
trial (tag `mlflow.parentRunId`), found again by its `ttt.trial_id` tag on resume so a
resumed trial never gets a second run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ray.tune import Callback

from ttt import tags as TAG
from ttt.tracking import (
    client,
    find_run,
    finish,
    log_eval_artifacts,
    log_metrics,
    log_params,
    run_link,
    run_tags,
)


def short_name(config: dict) -> str:
    """A trial's MLflow run name: its swept values, the mixer first and bare, so that names
    differ in their first characters where the UI cuts them (`ttt_e2e inner_lr=0.3`)."""
    from sweeps.spec import TrialStart

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
    ):
        self.tracking_uri, self.sweep, self.stage = tracking_uri, sweep, stage
        self.role = role  # trial, or eval for a `task: eval` sweep
        self.metric, self.mode = metric, mode  # what "best" means on the parent run
        self.parent_run_id = parent_run_id
        self.params_of = params_of  # trial.config -> flat config dict
        self._reset()

    def _reset(self):
        self._client = None
        self._runs: dict[str, str] = {}  # trial_id -> run_id
        self._last_step: dict[str, int] = {}
        self._done: set[str] = set()
        self._nodes: dict[str, list[str]] = {}  # run_id -> node ids, in order

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_client", "_runs", "_last_step", "_done", "_nodes", "driver_log"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        return self.client.get_run(self.parent_run_id).info.experiment_id

    def run_id(self, trial) -> str:
        """The trial's child run: found by tag after a restore, created otherwise."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        c, exp = self.client, self.experiment_id()
        tags = {TAG.TRIAL_ID: trial.trial_id, TAG.SWEEP: self.sweep, TAG.STAGE: self.stage}
        found = find_run(c, exp, {TAG.TRIAL_ID: trial.trial_id})
        if found is not None:
            run_id = found.info.run_id
            history = c.get_metric_history(run_id, "loss")
            self._last_step[run_id] = max((m.step for m in history), default=0)
            self._nodes[run_id] = [n for n in found.data.tags.get(TAG.NODE_IDS, "").split(",") if n]
            if found.data.tags.get(TAG.OUTCOME) == "finished":
                self._done.add(run_id)  # Tune may restart it; MLflow already has it all
            elif found.info.status != "RUNNING":
                c.update_run(run_id, status="RUNNING")
        else:
            run = c.create_run(
                exp,
                run_name=short_name(trial.config),
                tags={
                    **run_tags(self.role, f"ttt sweep run ({self.sweep}, stage {self.stage})"),
                    **tags,
                    "mlflow.parentRunId": self.parent_run_id,
                },
            )
            run_id = run.info.run_id
            log_params(c, run_id, self.params_of(trial.config))
            c.set_tag(run_id, TAG.RUN_DIR, str(trial.path))
            self._last_step[run_id] = 0
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        self.client.set_tag(run_id, TAG.TRIAL_NAME, str(trial))
        link = run_link(self.tracking_uri, self.experiment_id(), run_id)
        print(f"trial {trial} (Ray trial {trial.trial_id}): MLflow {link}", flush=True)
        self._update_parent(trials)

    def _update_parent(self, trials, ended=None, as_state: str = "") -> None:
        """The parent run as a sweep's summary while it runs: how many trials finished,
        run and failed (metrics, one point per change), the best result so far, and its
        description with a link to the best trial's run (the UI renders it as Markdown)."""
        counts = {"finished": 0, "running": 0, "failed": 0, "pending": 0}
        key = {"TERMINATED": "finished", "RUNNING": "running", "ERROR": "failed"}
        for t in trials:
            # Tune calls the callback before it sets the ended trial's status
            counts[as_state if t is ended else key.get(t.status, "pending")] += 1
        # x: trials ended so far (monotone across a driver restart, unlike a call count)
        step = counts["finished"] + counts["failed"]
        metric = getattr(self, "metric", "eval_loss")  # a callback restored from older state
        metrics = {f"trials_{k}": float(v) for k, v in counts.items()}
        done = [
            t
            for t in trials
            if (t.status == "TERMINATED" or (t is ended and as_state == "finished"))
            and (t.last_result or {}).get(metric) is not None
        ]
        lines = [
            f"**Sweep {self.sweep}**, stage {self.stage}: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.parent_run_id, metrics=batch)
        self.client.set_tag(self.parent_run_id, "mlflow.note.content", "\n\n".join(lines))
        log = getattr(self, "driver_log", None)  # set by the driver; not pickled
        if log is not None:
            log.upload()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id(trial)
        if result.get("provenance") and run_id not in self._done:
            # the trial's code, JAX and devices, in its first report of each attempt
            for k, v in json.loads(result["provenance"]).items():
                self.client.set_tag(run_id, k, v)
            if result.get("flops_per_token") is not None:
                flops = f"{result['flops_per_token']:.6g}"
                self.client.set_tag(run_id, TAG.FLOPS_PER_TOKEN, flops)
        step = int(result.get("step", result.get("training_iteration", 0)))
        if run_id in self._done or step <= self._last_step.get(run_id, 0):
            return  # already logged before the driver restarted
        self._last_step[run_id] = max(step, self._last_step.get(run_id, 0))
        eval_step = result.get("eval_step")
        if eval_step is not None and eval_step != step:  # an evaluation made before `step`
            log_metrics(self.client, run_id, {"eval_loss": result["eval_loss"]}, eval_step)
            result = {k: v for k, v in result.items() if k != "eval_loss"}
        log_metrics(self.client, run_id, result, step)
        if result.get("node_id"):
            self.client.set_tag(run_id, TAG.NODE_ID, result["node_id"])
            if result.get("node_ip"):
                self.client.set_tag(run_id, TAG.NODE_IP, result["node_ip"])
            seen = self._nodes.setdefault(run_id, [])
            if result["node_id"] not in seen:  # every node the trial ran on, in order
                seen.append(result["node_id"])
                self.client.set_tag(run_id, TAG.NODE_IDS, ",".join(seen))
                # JAX processes of this attempt (> 1 for a multi-node trial)
                self.client.set_tag(run_id, TAG.PROCESSES, str(result.get("processes", 1)))
        if result.get("start_step"):  # this attempt continued from a checkpoint
            self.client.set_tag(run_id, TAG.RESUMED_FROM, str(result["start_step"]))

    def _log_eval(self, trial, run_id: str) -> None:
        """The final checkpoint carries the eval outputs (per-token NLL Parquet)."""
        ckpt = trial.checkpoint
        if ckpt is None:
            return
        from analysis.figures import eval_figure_files

        with ckpt.as_directory() as d:
            log_eval_artifacts(self.client, run_id, Path(d), eval_figure_files)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.client.set_tag(self.run_id(trial), TAG.CHECKPOINT, checkpoint.path)

    def _finish(self, trial, outcome: str, message: str = "") -> None:
        run_id = self.run_id(trial)
        if run_id in self._done:
            return
        self._done.add(run_id)
        finish(self.client, run_id, outcome, message)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        outcome = last.get("outcome") or "early_stopped"
        if outcome == "finished" and self.run_id(trial) not in self._done:
            run_id = self.run_id(trial)
            self._log_eval(trial, run_id)
            if "eval_loss" in last:
                self.client.log_metric(
                    run_id,
                    "final_eval_loss",
                    float(last["eval_loss"]),
                    step=int(last.get("step", 0)),
                )
        self._finish(trial, outcome, last.get("message", ""))
        self._update_parent(trials, trial, "finished")

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        retries = int(self.client.get_run(run_id).data.tags.get(TAG.RETRIES, "0")) + 1
        self.client.set_tag(run_id, TAG.RETRIES, str(retries))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = ""
        path = getattr(trial, "error_file", None)
        if path and os.path.exists(path):
            error = Path(path).read_text().strip().splitlines()[-1]
        self._finish(trial, "error", error)
        self._update_parent(trials, trial, "failed")
