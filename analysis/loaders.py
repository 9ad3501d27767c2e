"""Polars frames over any MLflow tracking store.

- `runs`: one row per run (flattened params, latest metrics, status, outcome, sweep, stage);
- `metric_history`: long form `run_id, key, step, value`;
- `token_nll`: long form `run_id, position, nll` from each run's `eval/*.parquet` artifact.

Loading is bulk: runs come from paged `search_runs` calls (params and latest metrics
included); on a SQLite store the whole metric history is one SQL query. Other stores
fall back to one history request per run and key, issued concurrently.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import polars as pl

from ttt import tags as TAG
from ttt.errors import UserError
from ttt.tracking import client, sqlite_path

TAGS = {
    TAG.SWEEP: "sweep",
    TAG.STAGE: "stage",
    TAG.OUTCOME: "outcome",
    TAG.ROLE: "role",
    TAG.TRIAL_ID: "trial_id",
    TAG.FLOORS: "floors",
    "mlflow.parentRunId": "parent_run_id",
}


def _client(tracking_uri: str):

    return client(tracking_uri)


def _experiment_ids(c, experiments: Sequence[str] | None) -> dict[str, str]:
    """id -> name, for the named experiments (all active ones when None)."""
    if experiments:
        found = {}
        for name in experiments:
            exp = c.get_experiment_by_name(name)
            if exp is not None:
                found[exp.experiment_id] = exp.name
        return found
    return {e.experiment_id: e.name for e in c.search_experiments()}


def require_experiments(tracking_uri: str, experiments: Sequence[str]) -> None:
    """A name that is not an experiment in the store is a user error listing those that are."""

    c = _client(tracking_uri)
    missing = [n for n in experiments if c.get_experiment_by_name(n) is None]
    if missing:
        known = sorted(e.name for e in c.search_experiments())
        raise UserError(
            f"--experiment={missing[0]!r}: no such experiment in {tracking_uri} "
            f"(there: {', '.join(known) or 'none'})"
        )


def _parse(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "true": True, "false": False}.get(value, value)


def runs(
    tracking_uri: str, experiments: Sequence[str] | None = None, role: str | None = "trial"
) -> pl.DataFrame:
    """One row per run; params keep their dotted names (`model.window`)."""
    c = _client(tracking_uri)
    ids = _experiment_ids(c, experiments)
    rows: list[dict] = []
    if ids:
        token = None
        while True:
            page = c.search_runs(list(ids), max_results=1000, page_token=token)
            for r in page:
                tags = r.data.tags
                if role is not None and tags.get(TAG.ROLE) != role:
                    continue
                row = {
                    "run_id": r.info.run_id,
                    "experiment": ids[r.info.experiment_id],
                    "run_name": r.info.run_name,
                    "status": r.info.status,
                    "start_time": r.info.start_time,
                }
                row.update({col: tags.get(tag) for tag, col in TAGS.items()})
                row.update({k: _parse(v) for k, v in r.data.params.items()})
                row.update({f"metric.{k}": float(v) for k, v in r.data.metrics.items()})
                rows.append(row)
            token = page.token
            if not token:
                break
    if not rows:
        return pl.DataFrame(
            schema={
                "run_id": pl.String,
                "experiment": pl.String,
                "status": pl.String,
                "outcome": pl.String,
            }
        )
    frame = pl.DataFrame(rows, infer_schema_length=None, strict=False)
    return frame.rename(
        {
            c: c.removeprefix("metric.")
            for c in frame.columns
            if c.startswith("metric.") and c.removeprefix("metric.") not in frame.columns
        }
    )


def metric_history(
    tracking_uri: str, run_ids: Sequence[str], keys: Sequence[str] | None = None
) -> pl.DataFrame:
    """`run_id, key, step, value`, sorted; every key when `keys` is None."""
    schema = {"run_id": pl.String, "key": pl.String, "step": pl.Int64, "value": pl.Float64}
    run_ids = list(run_ids)
    if not run_ids:
        return pl.DataFrame(schema=schema)

    path = sqlite_path(tracking_uri)
    if path is not None:
        marks = ",".join("?" * len(run_ids))
        sql = f"SELECT run_uuid, key, step, value FROM metrics WHERE run_uuid IN ({marks})"
        args: list = list(run_ids)
        if keys:
            sql += f" AND key IN ({','.join('?' * len(keys))})"
            args += list(keys)
        with sqlite3.connect(path) as con:
            rows = con.execute(sql, args).fetchall()
        frame = pl.DataFrame(rows, schema=list(schema), orient="row")
    else:
        c = _client(tracking_uri)
        if keys is None:
            pairs = [(r, k) for r in run_ids for k in c.get_run(r).data.metrics]
        else:
            pairs = [(r, k) for r in run_ids for k in keys]
        with ThreadPoolExecutor(8) as pool:
            hist = pool.map(lambda p: (p, c.get_metric_history(*p)), pairs)
            rows = [(r, k, m.step, m.value) for (r, k), ms in hist for m in ms]
        frame = pl.DataFrame(rows, schema=list(schema), orient="row")
    return frame.cast(schema).sort(["run_id", "key", "step"])


def _local_artifact_dir(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def token_nll(
    tracking_uri: str, run_ids: Sequence[str], artifact: str = "eval/nll_by_position.parquet"
) -> pl.DataFrame:
    """`run_id, position, nll` from each run's per-token NLL artifact (runs without one
    are skipped)."""
    schema = {"run_id": pl.String, "position": pl.Int64, "nll": pl.Float64}
    return artifact_table(tracking_uri, run_ids, artifact, schema)


def token_bins(
    tracking_uri: str, run_ids: Sequence[str], artifact: str = "eval/nll_by_position_bins.parquet"
) -> pl.DataFrame:
    """`run_id, bin, first_position, nll, se, sequences`: each run's evaluation in log
    bins of position with its standard error over the held-out sequences
    (`ttt.train.evaluate`; runs evaluated before it was recorded have none)."""
    schema = {"run_id": pl.String, "bin": pl.Int64, "first_position": pl.Int64,
              "nll": pl.Float64, "se": pl.Float64, "sequences": pl.Int64}  # fmt: skip
    return artifact_table(tracking_uri, run_ids, artifact, schema)


def artifact_table(tracking_uri: str, run_ids: Sequence[str], artifact: str, schema: dict):
    """The `schema` columns (`run_id` added) of a Parquet artifact of each run; runs
    without it are skipped."""
    c = _client(tracking_uri)
    columns = [k for k in schema if k != "run_id"]
    parts = []
    for run_id in run_ids:
        local = _local_artifact_dir(c.get_run(run_id).info.artifact_uri)
        if local is not None:
            path = local / artifact
            if not path.is_file():
                continue
        else:
            # deferred: MLflow loads only to download a remote store's artifacts
            from mlflow.exceptions import MlflowException

            try:
                path = Path(c.download_artifacts(run_id, artifact))
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # auth or a server error: a figure must not lose data silently
                continue  # this run has no such artifact
        frame = pl.read_parquet(path, columns=columns)
        parts.append(frame.with_columns(pl.lit(run_id).alias("run_id")))
    if not parts:
        return pl.DataFrame(schema=schema)
    return pl.concat(parts).select(list(schema)).cast(schema)
