"""MLflow tracking, shared by single runs (`ttt train`), evaluations, bench rows and sweeps.

- `store`: where the records live (`--tracking-uri`, `$MLFLOW_TRACKING_URI`, `./mlflow.db`)
  and the UI links to them;
- `tracker`: `MlflowRun`, the one writer: every record is opened (or found again by its
  key tags) and written through it;
- `records`: what each command records (`MlflowReporter` for `ttt train`, evaluations,
  NIAH, bench rows);
- `provenance`: code, JAX and device tags, and system metrics.

Nothing here imports the analysis package or Ray: whoever has a figure to attach hands in
a renderer or the rendered file.
"""

from ttt.tracking.provenance import SYSTEM_PREFIX, SystemSampler, provenance
from ttt.tracking.records import (
    MlflowReporter,
    log_bench_rows,
    log_eval_artifacts,
    log_evaluation,
    log_niah,
)
from ttt.tracking.store import (
    DEFAULT_ARTIFACTS,
    DEFAULT_DB,
    announce,
    check_uri,
    client,
    default_tracking_uri,
    ensure_experiment,
    find_run,
    optional_uri,
    resolve_uri,
    run_link,
    sqlite_path,
    ui_base,
)
from ttt.tracking.tracker import METRIC_KEYS, OUTCOME_STATUS, MlflowRun, Tracker, run_tags

__all__ = [
    "DEFAULT_ARTIFACTS",
    "DEFAULT_DB",
    "METRIC_KEYS",
    "OUTCOME_STATUS",
    "SYSTEM_PREFIX",
    "MlflowReporter",
    "MlflowRun",
    "SystemSampler",
    "Tracker",
    "announce",
    "check_uri",
    "client",
    "default_tracking_uri",
    "ensure_experiment",
    "find_run",
    "log_bench_rows",
    "log_eval_artifacts",
    "log_evaluation",
    "log_niah",
    "optional_uri",
    "provenance",
    "resolve_uri",
    "run_link",
    "run_tags",
    "sqlite_path",
    "ui_base",
]
