"""Sweeps as Ray jobs on the local cluster `ttt sweep run` starts, as a user runs them:
two at once, one followed to its end, one left running after its terminal closed, then
stopped and resumed; what the dashboard, the job log and MLflow show of them; and a real
browser on the dashboard's job page and the MLflow runs list (screenshots in
build/screenshots/)."""

import atexit
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import headless_browser, serves, write_sweep_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCREENSHOTS = Path(__file__).parent.parent / "build" / "screenshots"


def ttt(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ttt.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(check, what: str, timeout: float = 300, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def runs(uri: str, experiment: str) -> list:
    from ttt.tracking import client

    c = client(uri)  # the store's creation is serialised with the driver's (polled early)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


class Sweeps:
    """The module's scenario, and what the tests check of it."""


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, corpus):
    from sweeps.cluster import find_local
    from sweeps.ray_compat import reset_token_cache

    tmp = tmp_path_factory.mktemp("jobs")
    s = Sweeps()
    s.tmp, s.uri = tmp, f"sqlite:///{tmp / 'mlflow.db'}"
    ray_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must be short
    # A machine that never ran Ray: an empty HOME (no ~/.ray/auth_token), no token in the
    # environment, a new cluster folder. This process uses the same HOME, to talk to it.
    s.home = tmp / "home"
    s.home.mkdir()
    old_home = os.environ["HOME"]
    s.env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")},
        "HOME": str(s.home),
        "TTT_RAY_DIR": ray_dir,
        "TTT_TUNE_VERBOSE": "0",
    }
    os.environ.update(HOME=str(s.home), TTT_RAY_DIR=ray_dir)  # for find_local() here
    # `long`: runs until stopped; `short`: two trials, an eval every two steps.
    s.long = write_sweep_spec(
        tmp / "long.yaml",
        corpus,
        "model.mixer=swa",
        name="long",
        max_failures=0,
        stop={"steps": 2000},
        checkpoint_every=5,
        resources={"cpu": 1},
    )
    s.short = write_sweep_spec(
        tmp / "short.yaml",
        corpus,
        "train.eval_every=2",
        name="short",
        max_failures=0,
        search={"model.mixer": {"grid": ["swa", "full"]}},
        stop={"steps": 4},
        resources={"cpu": 1},
    )
    common = ["--tracking-uri", s.uri, "--storage-path", str(tmp / "ray")]
    s.common = common
    # The long sweep from a "terminal" that then closes (SIGHUP to its session).
    log = (tmp / "long.log").open("w")
    follower = subprocess.Popen(
        [sys.executable, "-m", "ttt.cli", "sweep", "run", str(s.long), *common],
        env=s.env,
        cwd=tmp,
        stdout=log,
        stderr=log,
        start_new_session=True,
        # SIGHUP's default action, as a terminal's shell gives its jobs, even where the
        # tests themselves run with it ignored (under nohup)
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    try:
        yield from _scenario(s, tmp, follower, common)
    finally:
        follower.kill()  # a no-op once the hang-up has ended it
        follower.wait(timeout=30)
        ttt("sweep", "stop", "long", env=s.env, cwd=tmp, timeout=300)
        # Not waited for: Ray drains for about 30 s, mostly idle, while the next tests run
        # (their clusters have folders and ports of their own). Its folder goes at exit.
        cluster = find_local()
        if cluster is not None:
            os.kill(cluster.pid, signal.SIGTERM)
        atexit.register(shutil.rmtree, ray_dir, True)
        os.environ.pop("TTT_RAY_DIR", None)
        os.environ["HOME"] = old_home
        reset_token_cache()


def _scenario(s, tmp, follower, common):
    """The part of the fixture that can fail once the long sweep is running: the
    fixture's teardown stops the sweep and the cluster whatever happens here."""
    from sweeps.cluster import find_local
    from sweeps.ray_compat import reset_token_cache

    def long_reports():
        children = [r for r in runs(s.uri, "long") if r.data.tags.get("ttt.role") == "trial"]
        return children and "loss" in children[0].data.metrics

    def long_logged():
        log = (tmp / "long.log").read_text()
        if follower.poll() is not None:  # e.g. the cluster did not start: say why, at once
            pytest.fail(f"`ttt sweep run` exited with {follower.returncode}: {log[-2000:]}")
        return "Ray job long-" in log and long_reports()

    wait_for(long_logged, "the long sweep's first report")
    os.killpg(follower.pid, signal.SIGHUP)
    follower.wait(timeout=30)
    s.cluster = find_local()
    reset_token_cache()  # the token the cluster's start created in the new HOME
    s.client = s.cluster.client()
    (s.long_job,) = [j for j in s.client.list_jobs() if j.metadata.get("ttt.sweep") == "long"]
    time.sleep(3)
    s.long_status_after_hangup = s.client.get_job_status(s.long_job.submission_id).value
    # Meanwhile the short sweep runs to its end, followed in this "terminal".
    s.short_run = ttt("sweep", "run", str(s.short), *common, "--keep-cluster", env=s.env, cwd=tmp)
    yield s


def test_a_machine_that_never_ran_ray_gets_a_token_and_the_sweep_runs(sweeps):
    token = sweeps.home / ".ray" / "auth_token"
    assert token.is_file() and token.read_text().strip()
    log = (sweeps.tmp / "long.log").read_text()
    assert f"created a Ray auth token for the local cluster in {token}" in log, log[-2000:]
    assert sweeps.short_run.returncode == 0, sweeps.short_run.stderr[-3000:]
    assert "stage main: 2 finished" in sweeps.short_run.stdout


def test_a_sweep_is_a_ray_job_named_after_it_with_its_log(sweeps):
    out = sweeps.short_run.stdout + sweeps.short_run.stderr
    assert sweeps.short_run.returncode == 0, out[-3000:]
    (job,) = [j for j in sweeps.client.list_jobs() if j.metadata.get("ttt.sweep") == "short"]
    assert job.submission_id.startswith("short-") and job.status.value == "SUCCEEDED"
    assert f"/#/jobs/{job.submission_id}" in out  # where the dashboard shows it
    log = sweeps.client.get_job_logs(job.submission_id)
    # per-trial progress in the job's log, under each trial's name
    for mixer in ("swa", "full"):
        assert f"(trial mixer={mixer}_" in log, log[-3000:]
    assert "step 4/4  loss " in log and "eval_loss " in log
    # the driver printed each trial's MLflow link, in model-training mode
    assert log.count("MLflow http://127.0.0.1:5000/#/experiments/") == 2
    assert "?workflowType=machine_learning" in log
    assert "stage main: 2 finished" in out  # followed to its end in the terminal


def test_a_closed_terminal_leaves_the_sweep_running_and_two_run_at_once(sweeps):
    assert sweeps.long_status_after_hangup == "RUNNING"
    assert sweeps.short_run.returncode == 0  # while the long one ran on the same cluster
    status = sweeps.client.get_job_status(sweeps.long_job.submission_id).value
    assert status == "RUNNING", status
    listing = ttt("sweep", "cluster", env=sweeps.env, cwd=sweeps.tmp)
    assert "long-" in listing.stdout and "RUNNING" in listing.stdout
    assert "(kept up)" in listing.stdout  # the short sweep asked for --keep-cluster


def test_status_and_watch_read_the_record_while_running_and_after(sweeps):
    """From MLflow, not Tune's saved state (which calls a running trial PENDING): the long
    sweep's trial is running, with its step out of 2000; the finished one is finished."""
    uri = ["--tracking-uri", sweeps.uri]
    status = ttt("sweep", "status", "long", *uri, env=sweeps.env, cwd=sweeps.tmp)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "sweep long (running): 1 running", status.stdout
    head = next(ln.split() for ln in lines if ln.split()[:1] == ["trial"])  # the table's
    (row,) = [dict(zip(head, ln.split(), strict=False)) for ln in lines if " running " in ln]
    step, total = row["step"].split("/")
    assert total == "2000" and int(step) >= 1 and row["eta"].endswith(("s", "m")), row
    # The finished sweep: `watch` draws the table once and ends with the sweep's outcome.
    watch = ttt("sweep", "watch", "short", *uri, env=sweeps.env, cwd=sweeps.tmp)
    assert watch.returncode == 0, watch.stderr
    assert watch.stdout.startswith("sweep short (finished): 2 finished")
    assert "* best eval_loss " in watch.stdout
    listing = ttt("sweep", "ls", *uri, env=sweeps.env, cwd=sweeps.tmp)
    assert "long (running): 1 running" in listing.stdout
    assert "short (finished): 2 finished" in listing.stdout


def test_every_ray_service_listens_on_loopback_only(sweeps):
    import psutil

    keeper = psutil.Process(sweeps.cluster.pid)
    pids = {keeper.pid, *(p.pid for p in keeper.children(recursive=True))}
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert len(listening) >= 6, listening  # GCS, raylet, dashboard, agents, workers
    # Ray's client server port is 10001 unless told: two clusters on one machine collide
    start = next(p for p in keeper.children() if "start" in p.cmdline())
    cmd = start.cmdline()
    assert int(cmd[cmd.index("--ray-client-server-port") + 1]) != 10001
    for conn in listening:
        ip = ipaddress.ip_address(conn.laddr.ip)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        assert ip.is_loopback, (conn, psutil.Process(conn.pid).name())


def test_trials_are_told_apart_in_the_dashboard_and_in_mlflow(sweeps):
    from sweeps.ray_compat import default_token_path

    token = default_token_path().read_text().strip()
    req = urllib.request.Request(
        f"{sweeps.cluster.dashboard}/api/v0/actors?limit=1000&detail=1",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        actors = json.loads(r.read())["data"]["result"]["result"]
    names = {a.get("repr_name", "") for a in actors}
    assert any(n.startswith("trial mixer=swa_") for n in names), names
    # the running trial's step and loss as Ray metrics (what Prometheus would scrape)
    (port_file,) = Path(os.environ["TTT_RAY_DIR"], "session_latest").glob("metrics_export_port_*")
    url = f"http://127.0.0.1:{port_file.read_text().strip()}/metrics"

    def exported():
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        return [ln for ln in text.splitlines() if ln.startswith("ray_ttt_trial_loss{")]

    lines = wait_for(exported, "the trial gauges", timeout=60, every=2)
    assert any('sweep="long"' in ln and 'trial="' in ln for ln in lines), lines
    for run in runs(sweeps.uri, "short"):
        if run.data.tags["ttt.role"] != "trial":
            continue
        tags = run.data.tags
        assert tags["ttt.trial_id"] in tags["ttt.trial_name"]
        assert tags["ttt.node_id"] and tags["ttt.node_ip"] == "127.0.0.1"


def test_mlflow_reads_well(sweeps):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(sweeps.uri)
    exp = c.get_experiment_by_name("short")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the view the printed links open (the browser test opens them)
    view = json.loads(exp.tags["mlflow.sharedViewState.ttt-trials"])
    assert view["searchFilter"] == "tags.`ttt.role` = 'trial'"
    assert "params.`model.mixer`" in view["selectedColumns"]
    all_runs = runs(sweeps.uri, "short")
    (parent,) = [r for r in all_runs if r.data.tags["ttt.role"] == "sweep"]
    children = [r for r in all_runs if r.data.tags["ttt.role"] == "trial"]
    assert parent.data.tags["ttt.swept"] == "model.mixer"
    assert parent.data.params == {
        "sweep.model.mixer": "swa, full",
        "sweep.trials": "2",
        "sweep.stages": "main",
    }
    best = parent.data.tags["ttt.best_run_id"]
    assert parent.data.tags["ttt.best_run"] == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{best}"
        "?workflowType=machine_learning"
    )
    for run in children:
        run_id = run.info.run_id
        # the eval curve: every eval_every steps, each at its own step
        assert [m.step for m in c.get_metric_history(run_id, "eval_loss")] == [2, 4]
        # float32 values as the config wrote them, not 0.30000001192092896
        for m in c.get_metric_history(run_id, "lr"):
            assert m.value == float(str(np.float32(m.value))), m.value
        assert run.data.params["ttt.inner_lr_init"] == "0.1"
        assert "nats per token" in run.data.tags["mlflow.note.content"]
        assert run.data.tags["mlflow.source.name"] == "ttt sweep run (short, stage main)"
        files = {a.path for a in c.list_artifacts(run_id, "eval")}
        assert files == {
            f"eval/nll_by_position{suffix}"
            for suffix in (".parquet", ".png", "_binned.csv", "_bins.parquet")
        }
        local = Path(c.download_artifacts(run_id, "eval/nll_by_position_binned.csv"))
        head, *rows = local.read_text().splitlines()
        assert head == "first_position,last_position,nll_nats_per_token" and rows


def _browser():
    """A headless Chromium in a profile of its own (tests/conftest.py)."""
    return headless_browser()


def _text(driver, wanted: list[str], timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By

    def seen():
        body = driver.find_element(By.TAG_NAME, "body").text
        return body if all(w in body for w in wanted) else ""

    return wait_for(seen, f"the page to show {wanted}", timeout, every=1)


def _ray_login(driver, dashboard: str) -> None:
    """As a user does: paste the cluster's token into the dashboard's dialog."""
    from selenium.webdriver.common.by import By

    driver.get(f"{dashboard}/")
    (field,) = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, "div[role=dialog] input[type=password]"),
        "the dashboard's token dialog",
        timeout=60,
    )
    from sweeps.ray_compat import default_token_path

    field.send_keys(default_token_path().read_text().strip())
    (submit,) = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "SUBMIT"]
    submit.click()
    wait_for(
        lambda: not driver.find_elements(By.CSS_SELECTOR, "div[role=dialog] input"),
        "the dashboard to take the token",
        timeout=30,
    )


def test_a_browser_sees_the_running_job_and_the_finished_runs(sweeps):
    driver = _browser()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = 5000 + os.getpid() % 1000
    ui = subprocess.Popen(
        [sys.executable, "-m", "ttt.cli", "ui", "--tracking-uri", sweeps.uri, "--port", str(port)],
        env=sweeps.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # The dashboard's page of the running sweep's job: its name and its live log.
        job_id = sweeps.long_job.submission_id
        _ray_login(driver, sweeps.cluster.dashboard)
        driver.get(f"{sweeps.cluster.dashboard}/#/jobs/{job_id}")
        _text(driver, [job_id, "RUNNING", "Ray dashboard: ", "MLflow runs: "], timeout=90)
        driver.execute_script("window.scrollTo(0, 450)")  # down to the driver's log
        driver.save_screenshot(str(SCREENSHOTS / "ray-dashboard-job.png"))
        driver.get(f"{sweeps.cluster.dashboard}/#/jobs")
        _text(driver, [job_id, "short-"])
        driver.save_screenshot(str(SCREENSHOTS / "ray-dashboard-jobs.png"))

        # The two MLflow links the sweep printed, each in a browser that never opened the
        # UI (a fresh profile): nothing to expand, sort or pick before the trials show.
        wait_for(lambda: serves(f"http://127.0.0.1:{port}"), "ttt ui", timeout=120)
        out = sweeps.short_run.stdout + sweeps.short_run.stderr
        (table,) = [ln.split(": ", 1)[1].split(" (ttt ui")[0] for ln in out.splitlines()
                    if ln.startswith("MLflow runs: ")]  # fmt: skip
        (chart,) = [ln.split(": ", 1)[1] for ln in out.splitlines()
                    if "the trials' loss and eval_loss side by side:" in ln]  # fmt: skip
        (parent,) = [r for r in runs(sweeps.uri, "short") if r.data.tags["ttt.role"] == "sweep"]
        assert parent.data.tags["ttt.trials_view"] == chart  # the same link, kept with the sweep
        here = f"127.0.0.1:{port}"
        # The runs link: the trials flat, best first, the swept key and the losses as columns.
        fresh = _browser()
        try:
            fresh.get(table.replace("127.0.0.1:5000", here))
            body = _text(fresh, ["swa", "full", "model.mixer", "eval_loss", "final_eval_loss",
                                 "2 matching runs"])  # fmt: skip
            fresh.save_screenshot(str(SCREENSHOTS / "mlflow-runs.png"))
        finally:
            fresh.quit()
        # The chart link: the trials' loss and eval_loss curves, then what differs between
        # them and the parallel coordinates of the swept key against the final eval loss.
        fresh = _browser()
        try:
            fresh.get(chart.replace("127.0.0.1:5000", here))
            # each curve drawn, one line per trial: the charts' legends name them
            legends = [f"{m} ({k})" for m in ("swa", "full") for k in ("loss", "eval_loss")]
            body = _text(fresh, ["Curves", "2 matching runs", *legends])
            assert "trials_finished" not in body and "No charts" not in body, body[-2000:]
            fresh.save_screenshot(str(SCREENSHOTS / "mlflow-trials-chart.png"))
            fresh.execute_script(
                "document.evaluate(\"//*[text()='Trials']\", document, null, 9, null)"
                ".singleNodeValue.scrollIntoView()"
            )
            _text(fresh, ["Compare by", "model.mixer", "final_eval_loss"])
            fresh.save_screenshot(str(SCREENSHOTS / "mlflow-trials-differences.png"))
        finally:
            fresh.quit()
    finally:
        driver.quit()
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_stop_marks_the_runs_killed_and_a_rerun_resumes(sweeps):
    # A terminal following the sweep when it is stopped: the job ends STOPPED, so the
    # command fails (a script or `make` must not go on as if it had finished).
    out = (sweeps.tmp / "follow.log").open("w+")
    follower = subprocess.Popen(
        [sys.executable, "-m", "ttt.cli", "sweep", "run", str(sweeps.long), *sweeps.common],
        env=sweeps.env,
        cwd=sweeps.tmp,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    log = sweeps.tmp / "follow.log"
    wait_for(lambda: "already running as Ray job" in log.read_text(), "the follower", 120)
    stopped = ttt("sweep", "stop", "long", env=sweeps.env, cwd=sweeps.tmp, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped sweep long" in stopped.stdout
    follower.wait(timeout=120)
    assert follower.returncode == 1 and ": STOPPED" in log.read_text(), log.read_text()[-2000:]
    job_id = sweeps.long_job.submission_id
    assert sweeps.client.get_job_status(job_id).value == "STOPPED"
    # The stopped driver says how a ttt user resumes, not Tune's Tuner.restore(...) advice
    log = sweeps.client.get_job_logs(job_id)
    assert "the same `ttt sweep run` resumes it" in log and "Tuner.restore" not in log, log[-3000:]
    (parent,) = [r for r in runs(sweeps.uri, "long") if r.data.tags["ttt.role"] == "sweep"]
    (child,) = [r for r in runs(sweeps.uri, "long") if r.data.tags["ttt.role"] == "trial"]
    assert parent.info.status == "KILLED"
    assert child.info.status == "KILLED" and child.data.tags["ttt.outcome"] == "interrupted"
    status = ttt("sweep", "status", "long", "--tracking-uri", sweeps.uri, env=sweeps.env,
                 cwd=sweeps.tmp)  # fmt: skip
    assert status.stdout.startswith("sweep long (stopped): 1 stopped"), status.stdout
    # its driver's log, kept with the sweep after the cluster (and its copy) is gone
    from mlflow.tracking import MlflowClient

    (log,) = MlflowClient(sweeps.uri).list_artifacts(parent.info.run_id, "driver")
    assert log.path.startswith("driver/driver-") and log.file_size > 0
    again = ttt("sweep", "stop", "long", env=sweeps.env, cwd=sweeps.tmp)
    assert again.returncode == 2 and "is not running" in again.stderr
    # The same command again resumes it from its last checkpoint, in the same MLflow run
    # (here through --address, as on a cluster started by hand).
    rerun = ttt(
        "sweep",
        "run",
        str(sweeps.long),
        *sweeps.common,
        "--address",
        sweeps.cluster.gcs,
        "--detach",
        env=sweeps.env,
        cwd=sweeps.tmp,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    def resumed():
        (run,) = [r for r in runs(sweeps.uri, "long") if r.data.tags["ttt.role"] == "trial"]
        return run if run.data.tags.get("ttt.resumed_from") else None

    run = wait_for(resumed, "the resumed trial")
    assert run.info.run_id == child.info.run_id and int(run.data.tags["ttt.resumed_from"]) >= 5
