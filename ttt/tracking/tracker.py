"""The one writer of MLflow records: `MlflowRun`.

Every run this project records (a single `ttt train`, a sweep trial and its sweep's parent,
an evaluation, a NIAH result, a bench row) is opened here, found again by its key tags
when it already exists, and written through the same five calls (Levanter's tracker
shape): `log_hyperparameters`, `log`, `log_summary`, `set_tags`, `log_artifact`, then
`finish` with an outcome. `Tracker` is the interface, and records nothing itself: what a
caller holds when nothing is tracked.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ttt import tags as TAG
from ttt.tracking.provenance import SYSTEM_PREFIX
from ttt.tracking.store import client, ensure_experiment, find_run

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
# And every metric of an evaluation (`ttt.train.evaluate.EvalResult.metrics`): its
# standard error, context use, recall accuracy, what the inner steps bought.
EVAL_PREFIXES = ("eval_", "context_use", "recall_", "inner_gain_", "inner_update_")
OUTCOME_STATUS = {
    "finished": "FINISHED",
    "diverged": "FAILED",
    "early_stopped": "KILLED",
    "error": "FAILED",
    "interrupted": "KILLED",
}
# The step metric a resumed run continues after: every run that logs by step logs `loss`.
STEP_METRIC = "loss"
BATCH = 100  # MLflow's log_batch takes at most 100 params (and 1000 items)

# The run description (the UI's "Description" box): what each metric is, with its unit.
# `mfu` is logged only where the device's peak FLOP/s is known (a GPU or TPU the project
# has a peak for, or `train.peak_flops`; never on a CPU), so its line is added by whoever
# logs the first `mfu` (`described`).
DESCRIPTION = """**Metrics** (x axis: optimizer step)
- `loss`: training loss, nats per token (mean next-token cross-entropy of the outer objective)
- `eval_loss`, `final_eval_loss`: validation loss, nats per token; `eval_loss_se`: its
  standard error over the held-out sequences
- `context_use`: NLL at context lengths (window/2, window] minus at (T/2, T], nats (about
  0: no use of context beyond the window), `context_use_se` its standard error
- `recall_accuracy`, `recall_accuracy_dN` (distances N..2N-1), `recall_nll`: the recall
  task's exact-match accuracy and answer NLL
- `grad_norm`: global L2 norm of the outer gradient (before clipping)
- `lr`: outer learning rate; `inner_lr`: inner (test-time) learning rate, per step (only
  where there is an inner loop)
- `tokens_per_s`: training throughput, tokens per second (all devices)
{mfu}- `system/...`: MLflow's system metrics, each named with its unit (percent, megabytes)

**Artifacts**: `eval/nll_by_position.*`: validation NLL by token position (nats per token):
Parquet (all positions), PNG and a log-binned CSV.
"""
MFU_LINE = """- `mfu`: fraction of the devices' peak FLOP/s (the tag `ttt.flops_per_token` holds the
  model FLOPs per token it is computed from)
"""


def description(mfu: bool = False) -> str:
    """The run description, with the `mfu` line only for a run that logs it."""
    return DESCRIPTION.format(mfu=MFU_LINE if mfu else "")


def described(values: dict) -> dict[str, str]:
    """The description tag to set when `values` (a report) carries `mfu`, else nothing."""
    return {"mlflow.note.content": description(mfu=True)} if "mfu" in values else {}


def run_tags(role: str, source: str, **tags: str) -> dict[str, str]:
    """Tags every run this project creates: its role, the command as Source, and the
    description with units (without `mfu` until a report carries it: `described`)."""
    return {
        TAG.ROLE: role,
        "mlflow.source.name": source,
        "mlflow.note.content": description(),
        **tags,
    }


def _finite(values: dict, keys=None) -> dict[str, float]:
    """The numbers among `values` MLflow can plot (no bools, NaNs or strings), and with
    `keys` only the tracked ones."""
    return {
        k: float(v)
        for k, v in values.items()
        if (keys is None or k in keys or k.startswith((SYSTEM_PREFIX, *EVAL_PREFIXES)))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


class Tracker:
    """What a writer calls; this one records nothing."""

    def log_hyperparameters(self, params: dict) -> None: ...

    def log(self, values: dict, step: int) -> bool:
        """The tracked metrics of one report at `step`; False when that step was already
        logged (before a resume)."""
        return False

    def log_summary(self, values: dict, step: int = 0) -> None:
        """Metrics that are not a report of the loop (a final loss, an evaluation made
        before the step it rides on): logged as given."""

    def set_tags(self, tags: dict) -> None: ...

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...

    def finish(self, outcome: str, message: str = "") -> None: ...


class MlflowRun(Tracker):
    """One MLflow run. `open` finds it by its key tags in an experiment, or creates it
    with those tags, `tags` and `params`; `found` says which (the entity as found, or
    None), and `last_step` is where a found run's history ends."""

    def __init__(self, c, run_id: str, experiment_id: str, found=None):
        self.c, self.run_id, self.experiment_id, self.found = c, run_id, experiment_id, found
        # A `ttt.tracking.queue.WriteQueue`: writes go through it, on its thread, and
        # never wait on the server; None: each write is sent at once.
        self.queue = None
        self.last_step = 0
        if found is not None:
            history = c.get_metric_history(run_id, STEP_METRIC)
            self.last_step = max((m.step for m in history), default=0)

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str | None,
        key: dict[str, str] | None,
        *,
        experiment_id: str | None = None,
        name: str | None,
        tags: dict[str, str] | None = None,
        params: dict | None = None,
        parent_id: str | None = None,
        check=None,
        reopen: bool = True,
    ) -> MlflowRun:
        """Find-or-create. `check(found)` may refuse a found run before anything is
        written; `reopen` marks a found run RUNNING again (a resume). Without a `key`
        every call creates a run. The experiment is named (and made when missing) or
        given by `experiment_id`."""
        c = client(uri)
        exp = experiment_id or ensure_experiment(c, experiment, uri)
        found = find_run(c, exp, key) if key else None
        if found is not None:
            if check is not None:
                check(found)
            run = cls(c, found.info.run_id, exp, found)
            if reopen:
                run.reopen()
            return run
        tags = {**(tags or {}), **(key or {})}
        if parent_id is not None:
            tags["mlflow.parentRunId"] = parent_id
        run = cls(c, c.create_run(exp, run_name=name, tags=tags).info.run_id, exp)
        if params:
            run.log_hyperparameters(params)
        return run

    @classmethod
    def attach(cls, uri: str, run_id: str) -> MlflowRun:
        """A run already open elsewhere (a sweep's parent, from its trials' callback)."""
        c = client(uri)
        return cls(c, run_id, c.get_run(run_id).info.experiment_id)

    def through(self, queue) -> MlflowRun:
        """From now on, write through `queue` (`ttt.tracking.queue.WriteQueue`)."""
        self.queue = queue
        return self

    def _send(self, op: str, **fields) -> None:
        record = {"op": op, "run_id": self.run_id, **fields}
        if self.queue is not None:
            self.queue.submit(record)
        else:
            apply_record(self.c, record)

    def reopen(self) -> None:
        """Mark a found run RUNNING again: it is being resumed."""
        if self.found is None or self.found.info.status != "RUNNING":
            self._send("update_run", status="RUNNING")

    @property
    def tags(self) -> dict[str, str]:
        """The run's tags when it was found ({} for a new run)."""
        return dict(self.found.data.tags) if self.found is not None else {}

    def log_hyperparameters(self, params: dict) -> None:
        items = [[k, str(v)[:6000]] for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self._send("log_batch", params=items[i : i + BATCH])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        self._points([(k, v, step) for k, v in values.items()])

    def _points(self, points: list[tuple[str, float, int]]) -> None:
        now = int(time.time() * 1000)
        metrics = [[k, v, now, step] for k, v, step in points]
        for i in range(0, len(metrics), 1000):  # log_batch's limit
            self._send("log_batch", metrics=metrics[i : i + 1000])

    def log_history(self, history: dict[str, list[tuple[int, float]]]) -> None:
        """Whole metric histories at once (`metric -> [(step, value)]`): a fixture's."""
        self._points([(k, float(v), step) for k, pts in history.items() for step, v in pts])

    def log(self, values: dict, step: int) -> bool:
        if step <= self.last_step:  # steps count from 1
            return False
        self.last_step = step
        self._metrics(_finite(values, METRIC_KEYS), step)
        return True

    def log_summary(self, values: dict, step: int = 0) -> None:
        self._metrics(_finite(values), step)

    def set_tags(self, tags: dict) -> None:
        items = [[k, str(v)[:5000]] for k, v in tags.items()]
        if items:
            self._send("log_batch", tags=items)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._send("log_artifact", path=str(path), folder=folder)

    def finish(self, outcome: str, message: str = "") -> None:
        tags = {TAG.OUTCOME: outcome, **({TAG.MESSAGE: message} if message else {})}
        self.set_tags(tags)
        self._send("set_terminated", status=OUTCOME_STATUS[outcome])

    def end(self, status: str) -> None:
        """End with an MLflow status alone (a sweep's parent: no outcome of its own)."""
        self._send("set_terminated", status=status)


def apply_record(c, record: dict) -> None:
    """Send one write (`MlflowRun._send`'s record, plain JSON so that a queue can keep it
    on disk) with the MLflow client `c`."""
    from mlflow.entities import (  # deferred: as MLflow's client (ttt.tracking.store)
        Metric,
        Param,
        RunTag,
    )

    op, run_id = record["op"], record["run_id"]
    if op == "log_batch":
        c.log_batch(
            run_id,
            metrics=[Metric(*m) for m in record.get("metrics", ())],
            params=[Param(*p) for p in record.get("params", ())],
            tags=[RunTag(*t) for t in record.get("tags", ())],
        )
    elif op == "update_run":
        c.update_run(run_id, status=record["status"])
    elif op == "set_terminated":
        c.set_terminated(run_id, status=record["status"])
    elif op == "log_artifact":
        c.log_artifact(run_id, record["path"], artifact_path=record.get("folder"))
    else:
        raise ValueError(f"not a tracking record: {op!r}")
