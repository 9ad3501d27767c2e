"""What the links a sweep prints open on in MLflow's UI, in a browser that has never
opened it: the trials, flat (not folded under the sweep's parent run), their swept values
and eval losses as table columns, and in the chart view their `loss` and `eval_loss`
curves, a table of what differs between them and a parallel-coordinates chart of the
swept keys against the metric.

MLflow keeps a runs page's whole state (filter, sort, columns, charts) only in the
browser, except for a view shared with its "Share" button: that is an experiment tag,
`mlflow.sharedViewState.<key>`, holding the state as JSON, and the link
`#/experiments/ID/runs?viewStateShareKey=<key>` opens it. A sweep writes such a view
when it starts (`sweeps.driver.open_parent`). The state's fields are the MLflow UI's own
(tested with MLflow 3.17: tests/test_jobs.py opens the printed links in a fresh headless
Chromium); the parent run's `expanded` state is not part of a shared view, which is why
the view lists the trials alone, sorted by the metric (MLflow nests child runs only when
it sorts by start time).

Run colours: MLflow colours a run by a hash of its id, so two trials can share a colour;
a run's `mlflow.runColor` tag (what the UI's colour picker writes) overrides it. Each
trial gets one of `PALETTE`'s 20 colours by its index in the sweep, so up to 20 trials of
a stage are told apart.
"""

from __future__ import annotations

import json

SHARED_VIEW_TAG = "mlflow.sharedViewState."
RUN_COLOR_TAG = "mlflow.runColor"
TRIALS_VIEW = "ttt-trials"  # the key of a sweep's view (one experiment per sweep)

# Matplotlib's tab10, then the light halves of tab20: 20 colours MLflow's charts tell apart.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


def run_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # MLflow's canonical column key: params.`model.window`


def _card(uuid: str, section: str, kind: str, **fields) -> dict:
    return {"uuid": uuid, "type": kind, "runsCountToCompare": 100, "metricSectionId": section,
            "deleted": False, "isGenerated": False, **fields}  # fmt: skip


def _curve(metric: str) -> dict:
    return _card(
        f"ttt-{metric}", "ttt-curves", "LINE", metricKey=metric, selectedMetricKeys=[metric],
        displayName=metric, lineSmoothness=0, xAxisScaleType="linear", scaleType="linear",
        range={}, xAxisKey="step", selectedXAxisMetricKey="", yAxisKey="metric",
        yAxisExpressions=[], ignoreOutliers=False, useGlobalXaxisKey=True,
        useGlobalLineSmoothing=True,
    )  # fmt: skip


def trials_view(swept: list[str], metric: str = "eval_loss", mode: str = "min",
                role: str = "trial", curves=("loss", "eval_loss")) -> dict:  # fmt: skip
    """The runs page's state for a sweep's trials: only runs of `role`, best first by
    `metric` (which also lists them flat), the losses and the swept keys as columns; the
    chart view's curves, then the trials' differences and parallel coordinates."""
    finals = list(dict.fromkeys([metric, "eval_loss", "final_eval_loss", "loss"]))
    charts = [
        *(_curve(m) for m in curves),
        _card("ttt-differences", "ttt-trials", "DIFFERENCE",
              chartName="What differs between the trials",
              compareGroups=["Parameters", "Model metrics"], showChangeFromBaseline=False,
              showDifferencesOnly=True, baselineColumnUuid=""),
        _card("ttt-parallel", "ttt-trials", "PARALLEL", selectedParams=list(swept),
              selectedMetrics=[metric if metric != "eval_loss" else "final_eval_loss"],
              showAllRuns=True),
    ]  # fmt: skip
    # the losses first: they stay in sight beside the run names on a narrow screen
    columns = [*(_column("metrics", m) for m in finals), *(_column("params", k) for k in swept)]
    return {
        "searchFilter": f"tags.`ttt.role` = '{role}'",
        "orderByKey": _column("metrics", metric),
        "orderByAsc": mode == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": columns,
        "compareRunCharts": charts,
        "compareRunSections": [
            {
                "uuid": "ttt-curves",
                "name": "Curves",
                "display": True,
                "isReordered": False,
                "columns": len(curves) or 1,
            },
            {
                "uuid": "ttt-trials",
                "name": "Trials",
                "display": True,
                "isReordered": False,
                "columns": 1,
            },
        ],  # fmt: skip
        "isAccordionReordered": False,
        "hideEmptyCharts": True,
        "useGroupedValuesInCharts": False,
        "runsHiddenMode": "SHOW_ALL",
    }


def view_tag(state: dict, key: str = TRIALS_VIEW) -> tuple[str, str]:
    """The experiment tag (name, value) that shares `state` under `key`."""
    return SHARED_VIEW_TAG + key, json.dumps(state, separators=(",", ":"))
