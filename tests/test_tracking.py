"""Tracking conventions as a user meets them: which store, a server that is not there, a
single `ttt train` run tracked like a sweep trial, and a cluster address to join."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PICO_TRAIN, write_sweep_spec

from ttt.cli import main
from ttt.tracking import default_tracking_uri, resolve_uri


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(argv, capsys) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    took = time.perf_counter() - t0
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error")]
    assert e.value.code == 2 and len(err) == 1, err
    return err[0], took


def test_the_store_comes_from_the_flag_then_the_environment(monkeypatch, tmp_path, capsys):
    assert resolve_uri(None) == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert resolve_uri(None) == "sqlite:///from-env.db"
    assert resolve_uri("http://127.0.0.1:1") == "http://127.0.0.1:1"
    # through the command: `ttt plots` reads the store the variable names
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    err, _ = _error(["plots"], capsys)
    assert str(tmp_path / "env.db") in err


def test_an_unreachable_server_fails_fast_in_one_line(tmp_path, corpus, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    spec = write_sweep_spec(tmp_path / "s.yaml", corpus, name="unreachable")
    for argv in (
        ["plots", "--tracking-uri", uri],
        ["sweep", "run", str(spec), "--tracking-uri", uri],
        ["train", "pico", *PICO_TRAIN, f"data.source={corpus}", "--tracking-uri", uri],
        ["bench", "train", "pico", "--tracking-uri", uri],
    ):
        err, took = _error(argv, capsys)
        assert uri in err and "ttt tracking serve" in err, err
        assert took < 10, (argv, took)
    assert not (tmp_path / "ray_results").exists()


def test_joining_a_cluster_checks_the_address_and_the_token(tmp_path, corpus, monkeypatch, capsys):
    spec = write_sweep_spec(tmp_path / "s.yaml", corpus, name="join")
    db = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    err, took = _error(
        ["sweep", "run", str(spec), "--address", f"127.0.0.1:{closed_port()}", *db], capsys
    )
    assert "no Ray cluster listens there" in err and took < 10
    # Something listens, but this machine has no token for it: say what to set, at once.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        err, took = _error(["sweep", "run", str(spec), "--address", address, *db], capsys)
    assert "RAY_AUTH_TOKEN" in err and "RAY_AUTH_MODE=disabled" in err and took < 10


@pytest.mark.slow
def test_a_single_run_is_tracked_like_a_trial(tmp_path, corpus, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = tmp_path / "run"
    base = ["train", "pico", *PICO_TRAIN, f"data.source={corpus}", "train.eval_batches=1"]
    opts = ["train.log_every=1", "train.eval_every=2", "-q", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main([*base, "train.steps=3", *opts, "--tracking-uri", uri])
    assert e.value.code == 0
    assert f"tracking: {uri}" in capsys.readouterr().err
    # A NIAH evaluation leaves eval/niah.parquet, which is not a per-position NLL table.
    niah = ["--task", "niah", "--seq-len", "512", "--depths", "0.5", "--niah-tasks", "niah1"]
    with pytest.raises(SystemExit) as e:
        main(["eval", str(out), *niah, "--samples", "1"])
    assert e.value.code == 0 and (out / "eval" / "niah.parquet").exists()
    # Extend it through the environment variable: the same MLflow run goes on.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(SystemExit) as e:
        main([*base, "train.steps=5", *opts])
    assert e.value.code == 0

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("runs")
    (r,) = c.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED" and r.data.tags["ttt.outcome"] == "finished"
    assert r.data.params["train.steps"] == "3" and r.data.params["model.mixer"] == "ttt_e2e"
    assert r.data.tags["ttt.extended_to_steps"] == "5"  # MLflow params cannot change
    loss = c.get_metric_history(r.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5]  # each step once, across the resume
    evals = sorted(m.step for m in c.get_metric_history(r.info.run_id, "eval_loss"))
    assert evals == [2, 3, 4, 5]  # an eval curve: every eval_every, and at each end
    assert "final_eval_loss" in r.data.metrics
    assert "system/cpu_utilization_percentage" in r.data.metrics
    tags = r.data.tags
    for key in ("ttt.version", "jax.version", "jax.backend", "device.kind", "device.count"):
        assert tags[key], key
    assert tags["ttt.run_dir"] == str(out) and tags["ttt.checkpoint"].endswith("checkpoints/5")
    assert tags["ttt.git_dirty"] in ("true", "false") and len(tags["ttt.git_commit"]) == 40
    arts = [a.path for a in c.list_artifacts(r.info.run_id, "eval")]
    assert arts == [
        "eval/nll_by_position.parquet",
        "eval/nll_by_position.png",
        "eval/nll_by_position_binned.csv",
        "eval/nll_by_position_bins.parquet",
    ]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["step"] == 5


def test_sqlite_path_reads_relative_and_absolute_uris():
    from ttt.tracking import sqlite_path

    assert sqlite_path("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlflow.db")
    assert sqlite_path("sqlite:///mlflow.db") == Path("mlflow.db")
    assert sqlite_path("http://127.0.0.1:5000") is None
    assert sqlite_path("sqlite:///:memory:") is None


@pytest.mark.slow
def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """A sweep's driver, the command that submitted it and `ttt ui` may open a new SQLite
    store at the same moment; MLflow's table creation is not safe against that, so
    ttt.tracking.client serialises it."""
    go = tmp_path / "go"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (
        "import os, sys, time\n"
        "from ttt.tracking import client\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        f"client({uri!r}).search_experiments()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(8)  # every process has imported MLflow and waits
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-800:] for e in errors)


def test_tracking_imports_no_figure_code_and_figures_leave_the_backend_alone():
    """Core tracking must not depend on the analysis package (which imports it: a
    circle), and importing the figures must not switch a notebook's Matplotlib backend."""
    code = (
        "import sys, ttt.tracking; "
        "assert 'ray' not in sys.modules, 'ttt.tracking imports Ray'; "
        "import sweeps.tracking; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('analysis', 'matplotlib')); "
        "assert not bad, bad; "
        "import matplotlib; matplotlib.use('svg'); import analysis.figures; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_run_is_found_again_by_its_key_and_continues_after_its_last_step(tmp_path):
    """Find-or-create, the resume rule and the outcome, as every writer gets them."""
    from ttt.tracking import MlflowRun, client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    key = {"ttt.run_dir": "/runs/a"}
    first = MlflowRun.open(uri, "exp", key, name="a", params={"train.steps": 10})
    assert first.found is None
    assert first.log({"loss": 2.0, "note": "text", "lr": float("nan")}, 1)
    assert first.log({"loss": 1.5, "ignored_key": 3.0}, 2)
    first.finish("interrupted", "stopped by a signal")
    c = client(uri)
    assert c.get_run(first.run_id).info.status == "KILLED"

    again = MlflowRun.open(uri, "exp", key, name="a", params={"train.steps": 20})
    assert again.run_id == first.run_id and again.found is not None
    assert c.get_run(first.run_id).info.status == "RUNNING"
    assert again.last_step == 2
    assert not again.log({"loss": 9.0}, 2)  # logged before the resume
    assert again.log({"loss": 1.0}, 3)
    again.finish("finished")
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ttt.outcome"] == "finished"
    assert run.data.params == {"train.steps": "10"}  # params are the first start's
    assert set(run.data.metrics) == {"loss"}  # tracked, finite numbers only
    assert [m.value for m in c.get_metric_history(first.run_id, "loss")] == [2.0, 1.5, 1.0]

    def refuse(found):
        raise ValueError(found.info.run_id)

    with pytest.raises(ValueError, match=first.run_id):
        MlflowRun.open(uri, "exp", key, name="a", check=refuse)
    assert c.get_run(first.run_id).info.status == "FINISHED"  # left as it was
    other = MlflowRun.open(uri, "exp", None, name="a")  # no key: always a new run
    assert other.run_id != first.run_id


def test_the_sweeps_view_and_its_links():
    """What the printed links open on (the browser test in tests/test_jobs.py opens them):
    the trials alone, best first, the swept keys and losses as columns, then the curves."""
    from ttt.tracking import run_link
    from ttt.tracking.views import trials_view, view_tag

    view = trials_view(["model.mixer", "ttt.inner_lr"])
    assert view["searchFilter"] == "tags.`ttt.role` = 'trial'"
    assert view["orderByKey"] == "metrics.`eval_loss`" and view["orderByAsc"] is True
    assert view["selectedColumns"] == [
        "metrics.`eval_loss`", "metrics.`final_eval_loss`", "metrics.`loss`",
        "params.`model.mixer`", "params.`ttt.inner_lr`",
    ]  # fmt: skip
    charts = view["compareRunCharts"]
    assert [c["metricKey"] for c in charts if c["type"] == "LINE"] == ["loss", "eval_loss"]
    (parallel,) = [c for c in charts if c["type"] == "PARALLEL"]
    assert parallel["selectedParams"] == ["model.mixer", "ttt.inner_lr"]
    name, value = view_tag(view)
    assert name == "mlflow.sharedViewState.ttt-trials" and json.loads(value) == view
    link = run_link("sqlite:///x.db", "3", view="ttt-trials", charts=True)
    assert link == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&viewStateShareKey=ttt-trials&compareRunsMode=CHART"
    )


def test_the_parents_counters_agree_with_tune():
    """Tune calls on_trial_start before it marks the trial RUNNING: the second trial to
    start is counted running, not pending."""
    from types import SimpleNamespace as T

    from sweeps.tracking import trial_counts, trial_index

    first, second, third = T(status="RUNNING"), T(status="PENDING"), T(status="PENDING")
    assert trial_counts([first, second, third], second, "running") == {
        "finished": 0, "running": 2, "failed": 0, "pending": 1,
    }  # fmt: skip
    assert trial_counts([first, second], first, "finished")["finished"] == 1
    assert trial_index(T(trial_id="a1b2c_00007")) == 7


def test_trials_get_colours_of_their_own_and_no_mfu_where_none_is_logged():
    from ttt.tracking.tracker import described, run_tags
    from ttt.tracking.views import run_color

    assert len({run_color(i) for i in range(20)}) == 20  # MLflow's hash of the id can collide
    assert "`mfu`" not in run_tags("trial", "ttt sweep run")["mlflow.note.content"]
    assert described({"loss": 2.0}) == {}
    assert "`mfu`" in described({"loss": 2.0, "mfu": 0.3})["mlflow.note.content"]


def test_the_driver_log_keeps_no_terminal_colours(tmp_path):
    import io

    from sweeps.driver import _Tee

    terminal, path = io.StringIO(), tmp_path / "driver.log"
    with path.open("w") as f:
        tee = _Tee(terminal, f)
        tee.write("\x1b[36m(trial mixer=swa pid=1)\x1b[0m step 4/4  \x1b[1mloss 2.31\x1b[0m\n")
    assert path.read_text() == "(trial mixer=swa pid=1) step 4/4  loss 2.31\n"
    assert "\x1b[36m" in terminal.getvalue()  # the terminal still gets its colours


def test_status_shows_a_dash_for_knobs_that_do_nothing_for_the_rows_mixer(tmp_path):
    from analysis.synthetic import FakeRun, trial_params, write_store
    from sweeps.status import read_sweep, render
    from ttt import tags as TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    swept = ["model.mixer", "model.window", "ttt.inner_lr"]
    write_store(
        uri,
        [
            FakeRun("knobs", trial_params("full"), {"eval_loss": 3.0}, {"loss": [(4, 3.1)]}),
            FakeRun(
                "knobs",
                trial_params("swa", model__window=32),
                {"eval_loss": 2.9},
                {"loss": [(4, 3.0)]},
            ),  # fmt: skip
            FakeRun(
                "knobs",
                trial_params("ttt_e2e", ttt__inner_lr=0.3),
                {"eval_loss": 2.8},
                {"loss": [(4, 2.9)]},
            ),  # fmt: skip
        ],
        parent_tags={TAG.SWEPT: ", ".join(swept)},
    )
    view = read_sweep(uri, "knobs")
    points = {r.point["model.mixer"]: r.point for r in view.rows}
    assert points["full"] == {"model.mixer": "full", "model.window": "-", "ttt.inner_lr": "-"}
    assert points["swa"] == {"model.mixer": "swa", "model.window": "32", "ttt.inner_lr": "-"}
    assert points["ttt_e2e"]["ttt.inner_lr"] == "0.3" and points["ttt_e2e"]["model.window"] != "-"
    table = render(view).splitlines()
    (full,) = [ln.split() for ln in table if " full " in ln]  # name, its point, its state..
    assert full[1:5] == ["full", "-", "-", "finished"], table
