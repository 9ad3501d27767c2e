"""`ttt sweep status|ls`: read Tune's experiment state, no cluster needed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sweeps.spec import TrialStart
from ttt.errors import UserError


def _experiments(storage: Path) -> list[Path]:
    if not storage.is_dir():
        return []
    return sorted(
        p for p in storage.iterdir() if p.is_dir() and any(p.glob("experiment_state*.json"))
    )


def _trials(path: Path):
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(path)).trials


def _run_ids(tracking_uri: str | None, name: str) -> dict[str, str]:
    """trial id -> MLflow run id, where the store is at hand (never a reason to fail)."""
    if not tracking_uri:
        return {}
    from ttt.tracking import check_uri, client, sqlite_path

    if (db := sqlite_path(tracking_uri)) is not None and not db.exists():
        return {}
    try:
        check_uri(tracking_uri, timeout=2)
        c = client(tracking_uri)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            return {}
        runs = c.search_runs([exp.experiment_id], "tags.`ttt.role` = 'trial'", max_results=5000)
        return {r.data.tags.get("ttt.trial_id"): r.info.run_id for r in runs}
    except Exception:  # status stays readable with the store down
        return {}


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def sweep_status(name: str, storage: Path, tracking_uri: str | None = None) -> str:
    paths = [p for p in _experiments(storage) if p.name == name or p.name.startswith(f"{name}-")]
    if not paths:
        known = ", ".join(p.name for p in _experiments(storage)) or "none"
        raise UserError(f"sweep {name!r}: not found under {storage} (sweeps there: {known})")
    run_ids = _run_ids(tracking_uri, name)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = []
    for path in paths:
        trials = _trials(path)
        points = [TrialStart.of(t.config).point for t in trials]
        swept = sorted({k for p in points for k in p if len({str(q.get(k)) for q in points}) > 1})
        rows = [["trial", *swept, "status", "outcome", "step", "loss", "eval_loss", "mlflow_run"]]
        for t, point in zip(trials, points, strict=True):
            last = t.last_result or {}
            rows.append(
                [
                    t.trial_id,
                    *[str(point.get(k, "")) for k in swept],
                    t.status,
                    str(last.get("outcome", "")),
                    str(last.get("step", 0)),
                    fmt(last.get("loss")),
                    fmt(last.get("eval_loss")),
                    run_ids.get(t.trial_id, "-"),
                ]
            )
        lines += [f"{path.name}:", *("  " + r for r in _table(rows))]
    return "\n".join(lines)


def list_sweeps(storage: Path) -> str:
    rows = []
    for path in _experiments(storage):
        counts = Counter(t.status for t in _trials(path))
        rows.append(f"{path.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(rows) if rows else f"no sweeps under {storage}"
