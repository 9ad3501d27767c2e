"""`ttt sweep status|ls`: read Tune's experiment state, no cluster needed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

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


def sweep_status(name: str, storage: Path) -> str:
    paths = [p for p in _experiments(storage) if p.name == name or p.name.startswith(f"{name}-")]
    if not paths:
        known = ", ".join(p.name for p in _experiments(storage)) or "none"
        raise UserError(f"sweep {name!r}: not found under {storage} (sweeps there: {known})")
    lines = []
    for path in paths:
        lines.append(f"{path.name}:")
        for t in _trials(path):
            last = t.last_result or {}
            outcome = last.get("outcome", "")
            metric = last.get("eval_loss", last.get("loss"))
            shown = "-" if metric is None else f"{metric:.4f}"
            lines.append(
                f"  {t.trial_id}  {t.status:10} {outcome:9} step {last.get('step', 0):>6}"
                f"  {'eval_loss' if 'eval_loss' in last else 'loss'} {shown}"
            )
    return "\n".join(lines)


def list_sweeps(storage: Path) -> str:
    rows = []
    for path in _experiments(storage):
        counts = Counter(t.status for t in _trials(path))
        rows.append(f"{path.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(rows) if rows else f"no sweeps under {storage}"
