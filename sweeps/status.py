"""`ttt sweep status|watch|ls`: a sweep read from its durable record, MLflow.

Each trial's run holds its state, swept values, last step, last loss, last evaluation and
outcome, so the answer is the same while the sweep runs, after a stop and after the Ray
cluster is gone, and it takes one query. Trials the spec plans that have no run yet are
listed as pending.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from ttt.errors import UserError

# A trial's state, from its MLflow run's status and outcome.
STATE = {"RUNNING": "running", "SCHEDULED": "pending", "KILLED": "stopped", "FAILED": "error"}
COLUMNS = ["trial", "status", "step", "loss", "eval_loss", "tok/s", "eta", "mlflow_run"]


@dataclass
class Row:
    name: str
    stage: str
    point: dict[str, str]
    state: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    run_id: str = "-"


@dataclass
class SweepView:
    name: str
    state: str  # the parent run's: running, finished, stopped, error
    swept: list[str]
    stages: list[str]
    rows: list[Row] = field(default_factory=list)
    metric: str = "eval_loss"
    mode: str = "min"

    def best(self) -> Row | None:
        done = [r for r in self.rows if getattr(r, self.metric, None) is not None]
        if not done:
            return None
        pick = min if self.mode == "min" else max
        return pick(done, key=lambda r: getattr(r, self.metric))


def _latest(run) -> dict[str, tuple[float, int]]:
    """key -> (last value, its step); MLflow keeps the latest of each metric on the run."""
    objs = getattr(run.data, "_metric_objs", None)
    if objs is None:
        return {k: (v, 0) for k, v in run.data.metrics.items()}
    return {m.key: (m.value, m.step) for m in objs}


def _row(run, swept: list[str]) -> Row:
    tags, params, metrics = run.data.tags, run.data.params, _latest(run)
    outcome = tags.get("ttt.outcome")
    state = STATE.get(run.info.status, "finished")
    if run.info.status == "FINISHED":
        state = outcome or "finished"
    elif run.info.status == "FAILED" and outcome in ("diverged", "error"):
        state = outcome
    loss = metrics.get("loss")
    ev = metrics.get("eval_loss")
    tps = metrics.get("tokens_per_s")
    total = int(params.get("train.steps", 0) or 0)
    row = Row(
        name=run.info.run_name or tags.get("ttt.trial_name", run.info.run_id[:8]),
        stage=tags.get("ttt.stage", "main"),
        point={k: params.get(k, "") for k in swept},
        state=state,
        step=loss[1] if loss else 0,
        total=total,
        loss=loss[0] if loss else None,
        eval_loss=ev[0] if ev else None,
        eval_step=ev[1] if ev else None,
        tokens_per_s=tps[0] if tps else None,
        run_id=run.info.run_id,
    )
    if state == "running" and tps and tps[0] > 0 and total > row.step:
        per_step = int(params.get("data.batch_size", 0) or 0) * int(
            params.get("data.seq_len", 0) or 0
        )
        row.eta_s = (total - row.step) * per_step / tps[0] if per_step else None
    return row


def _planned(parent, swept: list[str]) -> tuple[list[dict[str, str]], str, str]:
    """The first stage's planned points (one per sample) from the spec the parent names,
    and the spec's metric and mode; nothing when the spec is gone."""
    from sweeps.spec import load_spec

    tags = parent.data.tags
    try:
        spec = load_spec(tags["ttt.spec"], tags.get("ttt.overrides", "").split(), tags["ttt.sweep"])
    except Exception:  # moved, edited or unreadable: the runs alone still answer
        return [], "eval_loss", "min"
    if spec.random or spec.search_alg != "basic":
        return [], spec.metric, spec.mode  # points drawn at run time are not known ahead
    points = [
        {k: str(p[k]) if k in p else "" for k in swept}
        for p in spec.points
        for _ in range(spec.num_samples)
    ]
    return points, spec.metric, spec.mode


def read_sweep(tracking_uri: str, name: str) -> SweepView:
    from ttt.tracking import check_uri, client, sqlite_path

    if (db := sqlite_path(tracking_uri)) is not None and not db.exists():
        raise UserError(f"sweep {name!r}: no MLflow store at {tracking_uri} (--tracking-uri?)")
    check_uri(tracking_uri)
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    parents = (
        c.search_runs([exp.experiment_id], "tags.`ttt.role` = 'sweep'", max_results=1)
        if exp is not None
        else []
    )
    if not parents:
        known = ", ".join(_sweep_names(c)) or "none"
        raise UserError(f"sweep {name!r}: not in {tracking_uri} (sweeps there: {known})")
    parent = parents[0]
    swept = [k for k in parent.data.tags.get("ttt.swept", "").split(", ") if k]
    stages = parent.data.params.get("sweep.stages", "main").split(", ")
    runs = c.search_runs(
        [exp.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=10000,
        order_by=["attributes.start_time ASC"],
    )
    planned, metric, mode = _planned(parent, swept)
    parent_state = STATE.get(parent.info.status, "finished")
    view = SweepView(name, parent_state, swept, stages, [_row(r, swept) for r in runs])
    view.metric, view.mode = metric, mode
    # Trials the first stage plans that have no run yet (Tune creates them as CPUs free up).
    have = [tuple(r.point.get(k, "") for k in swept) for r in view.rows if r.stage == "main"]
    for point in planned:
        key = tuple(point[k] for k in swept)
        if key in have:
            have.remove(key)
        else:
            state = "pending" if parent_state == "running" else "not started"
            view.rows.append(Row("-", "main", point, state))
    return view


def _sweep_names(c) -> list[str]:
    runs = c.search_runs(
        [e.experiment_id for e in c.search_experiments()],
        "tags.`ttt.role` = 'sweep'",
        max_results=1000,
    )
    return sorted({r.data.tags.get("ttt.sweep", "") for r in runs} - {""})


def _num(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _eta(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.0f}m" if s >= 60 else f"{s:.0f}s"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(view: SweepView) -> str:
    """One table per stage: a row per trial, the swept values as columns, the best trial
    (by the spec's metric) marked with *."""
    best = view.best()
    counts: dict[str, int] = {}
    for r in view.rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [f"sweep {view.name} ({view.state}): {summary or 'no trials yet'}"]
    for stage in view.stages:
        rows = [r for r in view.rows if r.stage == stage]
        if not rows:
            continue
        head = [COLUMNS[0], *view.swept, *COLUMNS[1:]]
        table = [head]
        for r in rows:
            mark = "*" if r is best else ""
            ev = _num(r.eval_loss)
            if r.eval_loss is not None and r.eval_step not in (None, r.step):
                ev += f"@{r.eval_step}"  # the last evaluation, made before the last step
            table.append(
                [
                    mark + r.name,
                    *[r.point.get(k, "") for k in view.swept],
                    r.state,
                    f"{r.step}/{r.total}" if r.total else str(r.step),
                    _num(r.loss),
                    ev,
                    "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                    _eta(r.eta_s),
                    r.run_id,
                ]
            )
        title = view.name if stage == "main" else f"{view.name}-{stage}"
        lines += [f"{title}:", *("  " + ln for ln in _table(table))]
    if best is not None:
        lines.append(f"* best {view.metric} {getattr(best, view.metric):.4f}: {best.name}")
    return "\n".join(lines)


def sweep_status(name: str, tracking_uri: str) -> str:
    return render(read_sweep(tracking_uri, name))


def watch(name: str, tracking_uri: str, every: float = 5.0, out=None) -> int:
    """Redraw the table every `every` seconds until the sweep is no longer running; the
    exit code (0 when it finished)."""
    out = out or sys.stdout
    tty = out.isatty()
    while True:
        view = read_sweep(tracking_uri, name)
        text = render(view)
        stamp = time.strftime("%H:%M:%S")
        if tty:
            out.write("\x1b[H\x1b[2J")  # redraw in place
        out.write(f"{text}\n(read from {tracking_uri} at {stamp}; Ctrl-C stops watching)\n")
        out.flush()
        if view.state != "running":
            return 0 if view.state == "finished" else 1
        time.sleep(every)


def list_sweeps(tracking_uri: str) -> str:
    from ttt.tracking import check_uri, client, sqlite_path

    if (db := sqlite_path(tracking_uri)) is not None and not db.exists():
        return f"no sweeps in {tracking_uri}"
    check_uri(tracking_uri)
    c = client(tracking_uri)
    lines = []
    for name in _sweep_names(c):
        view = read_sweep(tracking_uri, name)
        counts: dict[str, int] = {}
        for r in view.rows:
            counts[r.state] = counts.get(r.state, 0) + 1
        trials = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        lines.append(f"{name} ({view.state}): {trials or 'no trials yet'}")
    return "\n".join(lines) if lines else f"no sweeps in {tracking_uri}"
