"""`ttt sweep status|watch|ls`: a sweep read from its durable record, MLflow.

Each trial's run holds its state, swept values, last step, last loss, last evaluation and
outcome, so the answer is the same while the sweep runs, after a stop and after the Ray
cluster is gone, and it takes one query. Trials the spec plans that have no run yet are
listed as pending.
"""

from __future__ import annotations

import math
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from sweeps.spec import load_spec
from ttt import tags as TAG
from ttt.config import applies
from ttt.data.floors import NAMES, read_tag
from ttt.errors import UserError
from ttt.tracking import check_uri, client, sqlite_path
from ttt.tracking.queue import behind_line, sweep_queue_folder

# A trial's state, from its MLflow run's status and outcome.
STATE = {"RUNNING": "running", "SCHEDULED": "pending", "KILLED": "stopped", "FAILED": "error"}
COLUMNS = [
    "trial", "status", "step", "loss", "eval_loss", "ctx_use", "vs_floors", "tok/s", "eta",
    "mlflow_run",
]  # fmt: skip


@dataclass
class RunRecord:
    """What status needs of one MLflow run, however the store is read."""

    run_id: str
    name: str
    status: str
    start: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, tuple[float, int]]  # key -> (latest value, its step)


def _from_mlflow(run) -> RunRecord:
    objs = getattr(run.data, "_metric_objs", None)  # the latest of each key, with its step
    if objs is None:
        metrics = {k: (v, 0) for k, v in run.data.metrics.items()}
    else:
        metrics = {m.key: (m.value, m.step) for m in objs}
    info = run.info
    return RunRecord(
        info.run_id, info.run_name, info.status, info.start_time or 0, run.data.tags,
        run.data.params, metrics,
    )  # fmt: skip


class _SqliteStore:
    """A SQLite MLflow store read with plain SQL (read-only): no MLflow import, whose
    import alone takes seconds, so that `ttt sweep status` answers in about one."""

    def __init__(self, path):

        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def sweep_names(self) -> list[str]:
        rows = self.db.execute(
            "SELECT DISTINCT t.value FROM tags t JOIN tags r ON r.run_uuid = t.run_uuid "
            "JOIN runs ON runs.run_uuid = t.run_uuid WHERE t.key = ? AND "
            "r.key = ? AND r.value = 'sweep' AND runs.lifecycle_stage = 'active'",
            (TAG.SWEEP, TAG.ROLE),
        )
        return sorted(v for (v,) in rows)

    def runs(self, experiment: str) -> list[RunRecord]:
        q = (
            "SELECT runs.run_uuid FROM runs JOIN experiments e ON e.experiment_id = "
            "runs.experiment_id WHERE e.name = ? AND e.lifecycle_stage = 'active' AND "
            "runs.lifecycle_stage = 'active'"
        )
        found: dict[str, RunRecord] = {}
        for run_id, name, status, start in self.db.execute(
            "SELECT run_uuid, name, status, start_time FROM runs WHERE run_uuid IN "
            f"({q}) ORDER BY start_time",
            (experiment,),
        ):
            found[run_id] = RunRecord(run_id, name, status, start or 0, {}, {}, {})
        for table, into in (("tags", "tags"), ("params", "params")):
            sql = f"SELECT run_uuid, key, value FROM {table} WHERE run_uuid IN ({q})"
            for run_id, key, value in self.db.execute(sql, (experiment,)):
                getattr(found[run_id], into)[key] = value
        sql = f"SELECT run_uuid, key, value, step FROM latest_metrics WHERE run_uuid IN ({q})"
        for run_id, key, value, step in self.db.execute(sql, (experiment,)):
            found[run_id].metrics[key] = (value, step)
        return list(found.values())


class _MlflowStore:
    """Any other store, through MLflow's client."""

    def __init__(self, tracking_uri: str):

        check_uri(tracking_uri)
        self.c = client(tracking_uri)

    def sweep_names(self) -> list[str]:
        runs = self.c.search_runs(
            [e.experiment_id for e in self.c.search_experiments()],
            f"tags.`{TAG.ROLE}` = 'sweep'",
            max_results=1000,
        )
        return sorted({r.data.tags.get(TAG.SWEEP, "") for r in runs} - {""})

    def runs(self, experiment: str) -> list[RunRecord]:
        exp = self.c.get_experiment_by_name(experiment)
        if exp is None:
            return []
        found = self.c.search_runs(
            [exp.experiment_id], max_results=10000, order_by=["attributes.start_time ASC"]
        )
        return [_from_mlflow(r) for r in found]


def open_store(tracking_uri: str):

    db = sqlite_path(tracking_uri)
    if db is None:
        return _MlflowStore(tracking_uri)
    if not db.exists():
        raise UserError(f"no MLflow store at {tracking_uri} (--tracking-uri?)")
    return _SqliteStore(db)


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
    context_use: float | None = None
    context_use_se: float | None = None
    source: str = ""  # data.source, whose floors the eval loss is read against
    regime: str | None = None  # where the eval loss sits among them: "above bigram", ...

    @property
    def above_bigram(self) -> bool:
        return self.regime in ("above unigram", "above bigram")


@dataclass
class SweepView:
    name: str
    state: str  # the parent run's: running, finished, stopped, error
    swept: list[str]
    stages: list[str]
    rows: list[Row] = field(default_factory=list)
    metric: str = "eval_loss"
    mode: str = "min"
    floors: dict = field(default_factory=dict)  # data.source -> Floors
    tracking: str | None = None  # a line when the record here is behind the trials

    def summary(self) -> str:
        """How many trials are in each state: `4 finished, 1 running`."""
        counts = Counter(r.state for r in self.rows)
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials yet"

    def best(self) -> Row | None:
        done = [r for r in self.rows if getattr(r, self.metric, None) is not None]
        if not done:
            return None
        pick = min if self.mode == "min" else max
        return pick(done, key=lambda r: getattr(r, self.metric))


def _row(run: RunRecord, swept: list[str]) -> Row:
    tags, params, metrics = run.tags, run.params, run.metrics
    outcome = tags.get(TAG.OUTCOME)
    state = STATE.get(run.status, "finished")
    if run.status == "FINISHED":
        state = outcome or "finished"
    elif run.status == "FAILED" and outcome in ("diverged", "error"):
        state = outcome
    loss = metrics.get("loss")
    ev = metrics.get("eval_loss")
    tps = metrics.get("tokens_per_s")
    use, use_se = metrics.get("context_use"), metrics.get("context_use_se")
    total = int(params.get("train.steps", 0) or 0)
    row = Row(
        name=run.name or tags.get(TAG.TRIAL_NAME, run.run_id[:8]),
        stage=tags.get(TAG.STAGE, "main"),
        point=_point(params, swept),
        state=state,
        step=loss[1] if loss else 0,
        total=total,
        loss=loss[0] if loss else None,
        eval_loss=ev[0] if ev else None,
        eval_step=ev[1] if ev else None,
        tokens_per_s=tps[0] if tps else None,
        run_id=run.run_id,
        context_use=use[0] if use else None,
        context_use_se=use_se[0] if use_se else None,
        source=params.get("data.source", ""),
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

    tags = parent.tags
    try:
        spec = load_spec(tags[TAG.SPEC], tags.get(TAG.OVERRIDES, "").split(), tags[TAG.SWEEP])
    except Exception:  # moved, edited or unreadable: the runs alone still answer
        return [], "eval_loss", "min"
    if spec.random or spec.search_alg != "basic":
        return [], spec.metric, spec.mode  # points drawn at run time are not known ahead
    # Each point resolved as its trial's run logs it: a key that one variant sets and
    # another leaves to the config (model.fast_heads of a swa trial) has its config value.
    points = []
    for p in spec.points:
        flat = {k: str(v) for k, v in spec.config(p, {}).flat().items()}
        points += [_point({**{k: str(v) for k, v in p.items()}, **flat}, swept)] * spec.num_samples
    return points, spec.metric, spec.mode


NOT_APPLICABLE = "-"


def _point(params: dict[str, str], swept: list[str]) -> dict[str, str]:
    """A trial's swept values as its run logs them, with `-` for a knob that does nothing
    for its mixer (the TTT knobs of a `full` row: logged at their defaults, never used)."""
    mixer = params.get("model.mixer", "")
    return {
        k: params.get(k, "") if not mixer or applies(k, mixer) else NOT_APPLICABLE for k in swept
    }


def read_sweep(tracking_uri: str, name: str, store=None) -> SweepView:
    store = store or open_store(tracking_uri)
    records = store.runs(name)
    parents = [r for r in records if r.tags.get(TAG.ROLE) == "sweep"]
    if not parents:
        known = ", ".join(store.sweep_names()) or "none"
        raise UserError(f"sweep {name!r}: not in {tracking_uri} (sweeps there: {known})")
    parent = parents[0]
    swept = [k for k in parent.tags.get(TAG.SWEPT, "").split(", ") if k]
    stages = parent.params.get("sweep.stages", "main").split(", ")
    runs = [r for r in records if r.tags.get("mlflow.parentRunId") == parent.run_id]
    planned, metric, mode = _planned(parent, swept)
    parent_state = STATE.get(parent.status, "finished")
    view = SweepView(name, parent_state, swept, stages, [_row(r, swept) for r in runs])
    view.metric, view.mode = metric, mode
    view.floors = read_tag(parent.tags.get(TAG.FLOORS))
    storage = parent.tags.get(TAG.STORAGE_PATH)
    if storage:  # the driver's queue of writes, on this machine's disk
        view.tracking = behind_line(sweep_queue_folder(storage, name))
    for row in view.rows:
        floors = view.floors.get(row.source)
        row.regime = floors.regime(row.eval_loss) if floors is not None else None
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
    lines = [f"sweep {view.name} ({view.state}): {view.summary()}"]
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
                    _pm(r.context_use, r.context_use_se),
                    (r.regime or "-").replace(" ", "-") + ("!" if r.above_bigram else ""),
                    "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                    _eta(r.eta_s),
                    r.run_id,
                ]
            )
        title = view.name if stage == "main" else f"{view.name}-{stage}"
        lines += [f"{title}:", *("  " + ln for ln in _table(table))]
    if best is not None:
        lines.append(f"* best {view.metric} {getattr(best, view.metric):.4f}: {best.name}")
    lines += _floor_lines(view)
    if view.tracking:
        lines.append(view.tracking)
    return "\n".join(lines)


def _pm(value: float | None, se: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.3f}" + (f"±{se:.3f}" if se is not None and math.isfinite(se) else "")


def _floor_lines(view: SweepView) -> list[str]:
    """The floors the eval losses are read against, and what `!` means."""

    lines = []
    for source, f in view.floors.items():
        values = ", ".join(f"{NAMES[k]} {v:.3f}" for k, v in sorted(f.orders.items()))
        lines.append(f"floors of {source} (held-out nats/token, n-gram count models): {values}")
    if any(r.above_bigram for r in view.rows):
        lines.append(
            "! eval loss above the bigram floor: such a comparison is about how fast a model "
            "learns local statistics, not about its use of context"
        )
    if any(r.context_use is not None for r in view.rows):
        lines.append(
            "ctx_use: NLL at context (window/2, window] minus at (T/2, T], ± its standard "
            "error; about 0 for a model that uses no context beyond the window"
        )
    return lines


def sweep_status(name: str, tracking_uri: str) -> str:
    return f"{render(read_sweep(tracking_uri, name))}\n(read from {tracking_uri})"


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

    if (db := sqlite_path(tracking_uri)) is not None and not db.exists():
        return f"no sweeps in {tracking_uri}"
    store = open_store(tracking_uri)
    lines = []
    for name in store.sweep_names():
        view = read_sweep(tracking_uri, name, store)
        lines.append(f"{name} ({view.state}): {view.summary()}")
    return "\n".join(lines) if lines else f"no sweeps in {tracking_uri}"
