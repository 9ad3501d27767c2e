"""Where a project's MLflow records live, and how a user reaches them.

Where runs go: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else `./mlflow.db`. A server
URI is checked before anything else talks to it, so a wrong one costs seconds, not
MLflow's minutes of retries. Links open the UI in model-training mode.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlparse

from ttt.errors import UserError

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """SQLite in the working directory: no server needed."""
    return f"sqlite:///{Path(cwd or os.getcwd()).absolute() / DEFAULT_DB}"


def resolve_uri(flag: str | None) -> str:
    """The flag, then MLflow's own environment variable, then ./mlflow.db."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def optional_uri(flag: str | None) -> str | None:
    """For commands tracked only when asked: the flag, else MLflow's environment variable,
    else None. A store given is checked and announced before any work starts."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        check_uri(uri)
        announce(uri)
    return uri


def check_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a tracking server does not answer."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read(64)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        port = parsed.port or 5000
        raise UserError(
            f"tracking URI {uri}: no MLflow server answers ({reason}); start one with "
            f"`ttt tracking serve --port {port}`, or give another --tracking-uri"
        ) from None


def announce(uri: str) -> None:
    print(f"tracking: {uri}", file=sys.stderr)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` store (PATH relative or absolute)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///")
    return Path(path) if path and path != ":memory:" else None


@functools.cache
def _open_sqlite(tracking_uri: str, db: Path) -> None:
    """MLflow creates (and migrates) a SQLite store's tables the first time a process
    opens it, and two processes doing that at once fail ("table ... already exists"): a
    sweep's driver and its first trials, `ttt ui`, a notebook. One at a time, then; once
    per process, as MLflow keeps the opened store for the process's later clients."""

    from mlflow.tracking import (
        MlflowClient,  # deferred: MLflow's client takes about a second to import
    )

    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)


def client(tracking_uri: str):
    # Not mlflow.set_tracking_uri: it sets $MLFLOW_TRACKING_URI for the whole process,
    # which would then pick the store of every later command run in it.
    from mlflow.tracking import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is not None and db.parent.is_dir():
        _open_sqlite(tracking_uri, db)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(c, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if (db := sqlite_path(tracking_uri)) is not None:  # artifacts beside the database
        location = (db.parent / DEFAULT_ARTIFACTS).absolute().as_uri()
    # Opens on the runs table, not MLflow 3's GenAI traces page.
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)


def find_run(c, experiment_id: str, tags: dict[str, str]):
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0] if runs else None


def ui_base(tracking_uri: str, port: int = 5000) -> str:
    """Where a user sees these runs: the server itself, or what `ttt ui` serves."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


def run_link(
    tracking_uri: str,
    experiment_id: str | None = None,
    run_id: str | None = None,
    view: str | None = None,
    charts: bool = False,
):
    """A UI link in model-training mode (MLflow 3 opens on GenAI traces otherwise): the
    experiments, an experiment's runs, or one run. `view`: an experiment's runs as the
    shared view of that key shows them (`ttt.tracking.views`), in its table or, with
    `charts`, its chart view."""

    path = "#/experiments"
    if experiment_id is not None:
        path += f"/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    query = {"workflowType": "machine_learning"}
    if view is not None:
        query["viewStateShareKey"] = view
    if charts:
        query["compareRunsMode"] = "CHART"
    return f"{ui_base(tracking_uri)}/{path}?{urlencode(query)}"
