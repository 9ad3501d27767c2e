"""The layer around the model keeps one owner per job: these fail when a second one
appears (a run directory's file names, MLflow writes, the project's settings)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lines(pattern: re.Pattern, allowed: set[str]) -> list[str]:
    """`path:line: text` for each line of the packages' code matching `pattern`, outside
    the `allowed` files (relative paths)."""
    return [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("ttt", "sweeps", "analysis")
        for path in sorted((ROOT / package).rglob("*.py"))
        if str(path.relative_to(ROOT)) not in allowed
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]


def test_mlflow_is_written_by_one_class():
    """Every MLflow record is written through `ttt.tracking.tracker.MlflowRun`: no other
    module creates, logs to, tags or ends a run with the client directly (the client's
    log_artifact names the run and `artifact_path`; the tracker's does not)."""
    writes = re.compile(
        r"\.(create_run|log_batch|log_metric|log_param|set_tag|set_terminated|update_run)\("
        r"|\.log_artifact\(.*artifact_path="
    )
    offenders = _lines(writes, {"ttt/tracking/tracker.py"})
    assert not offenders, "\n".join(offenders)


def test_a_run_directory_is_spelled_by_rundir_alone():
    """The record files by name, and the folders joined onto a path (`run / "eval"`)."""
    names = re.compile(
        r"[\"'](run\.json|config\.yaml|metrics\.jsonl)[\"']|/\s*[\"'](checkpoints|eval)[\"/']"
    )
    offenders = _lines(names, {"ttt/rundir.py"})
    assert not offenders, "\n".join(offenders)


def test_the_projects_environment_is_read_in_one_place():
    reads = re.compile(r"environ(\.get)?[\[(][\"']TTT_|getenv\([\"']TTT_")
    offenders = _lines(reads, {"ttt/settings.py"})
    assert not offenders, "\n".join(offenders)
    readme = (ROOT / "README.md").read_text()
    from ttt.settings import Settings

    documented = set(re.findall(r"`(TTT_[A-Z_]+)`", readme))
    fields = {f"TTT_{name.upper()}" for name in Settings.__dataclass_fields__}
    assert fields <= documented, fields - documented
