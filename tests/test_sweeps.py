"""Sweeps on a local Ray cluster, tracked in MLflow (SQLite), started by the tests."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import PICO_SWEEP, data_overrides, write_sweep_spec

from sweeps.spec import load_spec
from ttt.errors import UserError

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def write_spec(path: Path, corpus, **fields) -> Path:
    return write_sweep_spec(path, corpus, **{"max_failures": 0, **fields})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["TTT_TUNE_VERBOSE"] = "0"
    ctx = ray.init(
        num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False
    )
    yield ctx
    ray.shutdown()


def mlflow_runs(uri: str, name: str):
    from ttt.tracking import client

    c = client(uri)  # the store's creation is serialised with the driver's (polled early)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ttt.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ttt.role") == "trial"]
    return c, parents, children


def _token() -> str:
    from sweeps.ray_compat import default_token_path

    return default_token_path().read_text().strip()


# Runs before the module's shared cluster starts: the driver here starts its own.
def test_killed_driver_resumes_without_duplicates(tmp_path, corpus):
    spec = write_spec(
        tmp_path / "resume.yaml",
        corpus,
        name="resume",
        max_concurrent=1,
        search={"model.mixer": "swa", "train.lr": {"grid": [3e-3, 2e-3, 1e-3]}},
        stop={"steps": 8},
        checkpoint_every=2,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "ttt.cli",
        "sweep",
        "run",
        str(spec),
        "--tracking-uri",
        uri,
        "--storage-path",
        str(tmp_path / "ray"),
        "--foreground",  # the driver in this process, so that killing it kills the driver
    ]
    env = {**os.environ, "TTT_TUNE_VERBOSE": "0"}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=log, stderr=log
    )
    finished_before = None
    deadline = time.time() + 480
    while time.time() < deadline:  # kill once one trial finished and another is under way
        time.sleep(1)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        # Touch the store only once the driver has created it: two processes migrating a
        # new SQLite schema at once break each other.
        if "MLflow runs: " not in (tmp_path / "driver.log").read_text():
            continue
        try:
            _, _, children = mlflow_runs(uri, "resume")
        except Exception:
            continue
        done = [r for r in children if r.info.status == "FINISHED"]
        if done and len(children) >= 2:
            finished_before = {r.info.run_id: r.info.end_time for r in done}
            break
    assert finished_before, (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    again = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    c, parents, children = mlflow_runs(uri, "resume")
    assert len(parents) == 1 and len(children) == 3  # no duplicate child runs
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 9)), steps  # each step logged once
        if run.info.run_id in finished_before:  # not re-run
            assert run.info.end_time == finished_before[run.info.run_id]


def test_end_to_end_sweep_with_dashboard(tmp_path, corpus, ray_cluster, capsys):
    from sweeps.driver import run_sweep

    # Four trials at once on two CPUs: MLflow (SQLite) must never see "database is locked".
    spec = load_spec(
        write_spec(
            tmp_path / "e2e.yaml",
            corpus,
            name="e2e",
            max_concurrent=4,
            resources={"cpu": 0.5},
            search={"train.lr": {"grid": [3e-3, 1e-3]}},
            # cheap mixers: the point is four trials at once (TTT trials run elsewhere here)
            variants=[{"model.mixer": "swa"}, {"model.mixer": "full"}],
            stop={"steps": 4},
            checkpoint_every=2,
            stages=[
                {"name": "ext", "from": "best", "steps": 2, "overrides": {"data.seq_len": 128}}
            ],
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    url = f"http://{ray_cluster.dashboard_url}/api/version"
    codes = {"with": [], "without": []}
    stop = threading.Event()

    def poll():  # the dashboard must answer while trials run
        while not stop.is_set():
            for kind, headers in (
                ("with", {"Authorization": f"Bearer {_token()}"}),
                ("without", {}),
            ):
                try:
                    with urllib.request.urlopen(
                        urllib.request.Request(url, headers=headers), timeout=5
                    ) as r:
                        codes[kind].append((r.status, json.loads(r.read())))
                except urllib.error.HTTPError as e:
                    codes[kind].append((e.code, None))
            time.sleep(1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    result = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    stop.set()
    poller.join()
    assert any(code == 200 and body for code, body in codes["with"]), codes
    assert all(code == 401 for code, _ in codes["without"]), codes

    assert [r["outcome"] for r in result.stages[0].rows] == ["finished"] * 4
    assert [r["outcome"] for r in result.stages[1].rows] == ["finished"]
    c, parents, children = mlflow_runs(uri, "e2e")
    ext = [r for r in children if r.data.tags["ttt.stage"] == "ext"]
    children = [r for r in children if r.data.tags["ttt.stage"] == "main"]
    assert len(parents) == 1 and len(children) == 4 and len(ext) == 1
    # the stage starts from the best first-stage trial's checkpoint, at the new length
    best = min(children, key=lambda r: r.data.metrics["final_eval_loss"])
    assert ext[0].data.params["data.seq_len"] == "128"
    assert ext[0].data.params["model.mixer"] == best.data.params["model.mixer"]
    assert ext[0].data.params["train.lr"] == best.data.params["train.lr"]
    assert "checkpoint" in ext[0].data.params["train.init_from"]
    assert ext[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ttt.swept"] == "model.mixer, train.lr"
    assert parent.data.tags["ttt.best_run_id"] == ext[0].info.run_id  # the last stage's best
    assert parent.data.tags["ttt.best_run"].endswith(
        f"/runs/{ext[0].info.run_id}?workflowType=machine_learning"
    )
    assert parent.data.tags["mlflow.source.name"].startswith("ttt sweep run ")
    assert [a.path for a in c.list_artifacts(parent.info.run_id, "spec")] == ["spec/e2e.yaml"]
    seen = set()
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["ttt.outcome"] == "finished"
        p = run.data.params
        seen.add((p["model.mixer"], float(p["train.lr"])))
        assert p["data.seq_len"] == "64" and p["train.steps"] == "4"
        history = c.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
        assert "final_eval_loss" in run.data.metrics
        assert [a.path for a in c.list_artifacts(run.info.run_id, "eval")] == [
            "eval/nll_by_position.parquet",
            "eval/nll_by_position.png",
            "eval/nll_by_position_binned.csv",
            "eval/nll_by_position_bins.parquet",  # the log bins' standard errors
        ]
        assert {"eval_loss_se", "context_use", "context_use_se"} <= set(run.data.metrics)
        tags = run.data.tags  # what a reader needs to trust the run later
        for key in ("ttt.version", "jax.version", "jax.backend", "device.kind", "ttt.run_dir"):
            assert tags.get(key), (key, tags)
        assert tags["device.count"] == "1" and "checkpoint" in tags["ttt.checkpoint"]
        assert "system/cpu_utilization_percentage" in run.data.metrics
    assert seen == {(m, lr) for m in ("swa", "full") for lr in (3e-3, 1e-3)}

    from ttt.cli import main

    # The parent as the sweep's summary: counts and the best so far, as metrics while it
    # ran; a clickable best trial in its description; the driver's log as an artifact.
    history = c.get_metric_history(parent.info.run_id, "trials_finished")
    assert max(m.value for m in history) == 4 and len(history) >= 4
    assert "best_eval_loss_so_far" in parent.data.metrics
    note = parent.data.tags["mlflow.note.content"]
    assert f"[{ext[0].info.run_name}](" in note and ext[0].info.run_id in note
    (log,) = [a.path for a in c.list_artifacts(parent.info.run_id, "driver")]
    text = Path(c.download_artifacts(parent.info.run_id, log)).read_text()
    assert "MLflow runs: " in text and "tensorboard --logdir" not in text
    # Short run names that differ early: the mixer bare, then the swept values.
    assert {r.info.run_name for r in children} == {
        f"{m} lr={lr}" for m in ("swa", "full") for lr in (0.003, 0.001)
    }
    assert "flops_per_token" not in children[0].data.metrics
    assert "inner_lr" not in children[0].data.metrics  # no inner loop in swa or full
    assert float(children[0].data.tags["ttt.flops_per_token"]) > 0

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sweep", "status", "e2e", "--tracking-uri", uri])
    status = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sweep", "ls", "--tracking-uri", uri])
    out = capsys.readouterr().out
    # each trial's point, state, step, losses and MLflow run, one row each, from MLflow
    lines = status.splitlines()
    assert lines[0] == "sweep e2e (finished): 5 finished", lines[0]
    head = lines[2].split()
    assert head == [
        "trial",
        "model.mixer",
        "train.lr",
        "status",
        "step",
        "loss",
        "eval_loss",
        "ctx_use",
        "vs_floors",
        "tok/s",
        "eta",
        "mlflow_run",
    ], head
    rows = [ln.split() for ln in lines if " finished " in ln]
    assert len(rows) == 5 and "e2e-ext:" in status
    ids = {r.info.run_id for r in [*children, *ext]}
    assert {r[-1] for r in rows} == ids
    assert {(r[-11], r[-10]) for r in rows[:4]} == {
        (m, str(lr)) for m in ("swa", "full") for lr in (3e-3, 1e-3)
    }
    assert all(r[-8] == "4/4" for r in rows[:4]) and rows[4][-8] == "2/2"  # a stage: 2 more
    # four steps of pico: every loss above the corpus's bigram floor, marked with !
    assert all(r[-4].startswith("above-") and r[-4].endswith("!") for r in rows)
    assert "floors of " in status and "! eval loss above the bigram floor" in status
    assert status.rstrip("\n").endswith(f"(read from {uri})")
    assert f"* best eval_loss {ext[0].data.metrics['final_eval_loss']:.4f}" in status
    assert out.strip() == "e2e (finished): 5 finished"
    # SQLite is read with plain SQL (no MLflow import): the same answer as MLflow's client
    from sweeps.status import _MlflowStore, read_sweep, render

    assert (
        render(read_sweep(uri, "e2e", _MlflowStore(uri))) == status.rstrip("\n").rsplit("\n", 1)[0]
    )
    # ... and needs no Ray (nor MLflow): it answers the same after the cluster is gone.
    code = (
        "import sys; from sweeps.status import sweep_status; "
        f"print(sweep_status('e2e', {uri!r})); "
        "assert not {'ray', 'mlflow'} & set(sys.modules), 'imported Ray or MLflow'"
    )
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert alone.returncode == 0 and alone.stdout == status, alone.stderr[-2000:]


def test_asha_stops_a_trial_early(tmp_path, corpus, ray_cluster):
    from sweeps.driver import run_sweep

    spec = load_spec(
        write_spec(
            tmp_path / "asha.yaml",
            corpus,
            name="asha",
            max_concurrent=1,
            search={"model.mixer": "swa", "train.lr": {"grid": [1e-2, 3e-3, 1e-5, 1e-6]}},
            stop={"steps": 8},
            scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2},
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    outcomes = [r["outcome"] for r in result.stages[0].rows]
    assert "early_stopped" in outcomes and "finished" in outcomes
    _, _, children = mlflow_runs(uri, "asha")
    stopped = [r for r in children if r.data.tags["ttt.outcome"] == "early_stopped"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    assert all(max(m for m in [int(r.data.params["train.steps"])]) == 8 for r in stopped)


def test_failing_and_diverging_trials(tmp_path, corpus, ray_cluster):
    from sweeps.driver import run_sweep

    empty = tmp_path / "not-a-dataset"  # exists, so the spec loads; fails in the trial
    empty.mkdir()

    spec = load_spec(
        write_spec(
            tmp_path / "fail.yaml",
            corpus,
            name="fail",
            max_concurrent=2,
            max_failures=1,
            variants=[
                {"model.mixer": "swa"},
                {"model.mixer": "swa", "data.source": str(empty)},
                {"model.mixer": "ttt_e2e", "ttt.inner_lr": 1e30, "ttt.inner_lr_warmup": 0},
            ],
            stop={"steps": 2},
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    outcomes = sorted(r["outcome"] for r in result.stages[0].rows)
    assert outcomes == ["diverged", "error", "finished"]
    _, _, children = mlflow_runs(uri, "fail")
    by = {r.data.tags["ttt.outcome"]: r for r in children}
    assert by["error"].info.status == "FAILED" and by["error"].data.tags["ttt.retries"] == "1"
    assert "not a readable Zarr array" in by["error"].data.tags["ttt.message"]
    # divergence is a result, not an infrastructure failure: no retry
    assert by["diverged"].info.status == "FAILED"
    assert "ttt.retries" not in by["diverged"].data.tags
    assert by["diverged"].data.tags["ttt.message"] == "diverged at step 1"
    assert by["finished"].info.status == "FINISHED"


def test_eval_sweep_over_an_imported_checkpoint(tmp_path, reference_data, ray_cluster):
    """`task: eval`: each trial evaluates an imported run at its length, is tracked as an
    eval run, and the loss-by-context figure draws from the sweep's own runs."""
    from conftest import REFERENCE_FIXTURE, REFERENCE_KNOBS

    from analysis.figures import FIGURES
    from analysis.recipes import Data
    from sweeps.driver import run_sweep
    from ttt.train.importer import import_reference

    run = tmp_path / "tiny-e2e"
    knobs = [*REFERENCE_KNOBS, f"data.source={reference_data}"]
    import_reference(str(REFERENCE_FIXTURE), run, None, knobs, bos_id=0)

    def spec(name: str, init_from) -> Path:
        search = {"train.init_from": str(init_from), "data.seq_len": {"grid": [64, 128]}}
        fields = {"name": "evals", "task": "eval", "search": search, "max_failures": 0}
        path = tmp_path / name
        path.write_text(yaml.safe_dump({**fields, "base": {"config": str(run / "config.yaml")}}))
        return path

    path = spec("eval.yaml", run)
    with pytest.raises(UserError, match="not a run directory with checkpoints"):
        missing = load_spec(spec("missing.yaml", tmp_path / "nope"))
        run_sweep(missing, tracking_uri=f"sqlite:///{tmp_path / 'x.db'}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(load_spec(path), tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    assert [r["outcome"] for r in result.stages[0].rows] == ["finished", "finished"]
    c, _, _ = mlflow_runs(uri, "evals")
    evals = c.search_runs(
        [c.get_experiment_by_name("evals").experiment_id], "tags.`ttt.role` = 'eval'"
    )
    assert len(evals) == 2 and all(r.data.params["train.steps"] for r in evals)
    table = FIGURES["eval_context_length"].recipe(Data(uri, ["evals"]))
    assert table["data.seq_len"].to_list() == [64, 128] and table["model"][0] == "tiny-e2e"
    # the same weights, length and batches as `ttt eval`: the same loss
    from ttt.evaluation import Request, evaluate

    (direct,) = evaluate(run, Request(seq_lens=(128,)))
    assert table["mean"][1] == pytest.approx(direct.summary["loss"], rel=1e-6)


BAD_SPECS = [
    ({"name": "x", "serach": {}}, "serach"),
    ({"name": "x", "search": {"model.windw": {"grid": [1]}}}, "search.model.windw"),
    ({"name": "x", "search": {"model.window": {"normal": [1, 2]}}}, "unknown distribution"),
    ({"name": "x", "search": {"ttt.inner_lr": {"loguniform": [0, 1]}}}, "loguniform"),
    ({"name": "x", "search": {"ttt.chunk": {"grid": [16, 48]}}}, "data.seq_len=64"),
    ({"name": "x", "scheduler": "hyperband"}, "scheduler"),
    ({"name": "x", "resources": {"tpu": 1}}, "resources.tpu"),
    ({"search": {}}, "name"),
    ({"name": "x", "resources": {"nodes": 1.5}}, "resources.nodes"),
    ({"name": "x", "resources": {"nodes": 2, "gpus_per_node": 0.5}}, "resources.gpus_per_node"),
    ({"name": "x", "resources": {"nodes": 3}}, "data.batch_size=4: must be a multiple"),
    ({"name": "x", "scheduler": {"type": "asha", "grace_period": 0}}, "scheduler.grace_period"),
    ({"name": "x", "scheduler": {"type": "asha", "reduction_factor": 1}}, "reduction_factor"),
    ({"name": "x", "scheduler": {"type": "asha", "metric": "los"}}, "scheduler.metric"),
    ({"name": "x", "scheduler": {"type": "asha", "grace_period": 9, "max_t": 4}}, "max_t=4"),
    ({"name": "x", "metric": "eval_los"}, "metric: 'eval_los' is not reported"),
    ({"name": "x", "search_alg": "optuna", "search": {"train.lr": {"grid": [1, 2]}}}, "search_alg"),
    ({"name": "x", "system_metrics": "yes"}, "system_metrics"),
    ({"name": "x", "task": "evaluate"}, "task: 'evaluate'; allowed are train, eval"),
    ({"name": "x", "task": "eval"}, "task: eval evaluates train.init_from's weights"),
    ({"name": "x", "task": "eval", "stages": [{"name": "s"}]}, "stages: not with task: eval"),
]


@pytest.mark.parametrize("fields,needle", BAD_SPECS)
def test_bad_specs_give_one_line_and_exit_2(tmp_path, corpus, fields, needle, capsys):
    from ttt.cli import main

    path = tmp_path / "bad.yaml"
    spec = {"base": {"config": "pico", "overrides": PICO_SWEEP}, **fields}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "run", str(path), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}") and needle in err[0], err


def test_a_missing_dataset_stops_the_sweep_and_warns_the_dry_run(tmp_path, capsys):
    """A sweep refuses a dataset that is not there, in one line, before Ray starts; a
    dry run says so in one warning line and prices the sweep anyway."""
    from ttt.cli import main

    path = tmp_path / "nodata.yaml"
    over = [*PICO_SWEEP, "data.source=/no/such/data"]
    path.write_text(yaml.safe_dump({"name": "x", "base": {"config": "pico", "overrides": over}}))
    needle = "data.source='/no/such/data': no such dataset directory"
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "run", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {path}"), err
    assert needle in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "run", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exc.value.code == 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"warning: {path}") and needle in lines[0] and "FLOPs" in out


SHIPPED = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_specs_pass_dry_run(path, corpus, capsys):
    """The paper-scale specs name datasets a user downloads: without them --dry-run says
    so; with `data.source=` (and `STAGE.data.source=`) on the command line they pass."""
    from ttt.cli import main

    sources = data_overrides(path, corpus)
    if "/data/" in path.read_text():  # (a `pydocs` spec needs only python3-doc installed)
        with pytest.raises(SystemExit) as exc:  # the sweep itself refuses to start ...
            main(["sweep", "run", str(path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "data.source='/data/" in err, err
        with pytest.raises(SystemExit) as exc:  # ... while a dry run warns and prices it
            main(["sweep", "run", str(path), "--dry-run"])
        out, err = capsys.readouterr()
        assert exc.value.code == 0 and err.startswith("warning:") and "data.source='/data/" in err
        assert "H200-hours" in out, out
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "run", str(path), *sources, "--dry-run"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert "distinct compiled shapes" in capsys.readouterr().out


def test_command_line_overrides_and_name(tmp_path, corpus, capsys):
    from ttt.cli import main

    path = write_spec(
        tmp_path / "o.yaml",
        corpus,
        name="o",
        search={"train.lr": {"grid": [1e-3, 2e-3]}},
        stages=[{"name": "ext", "steps": 2, "overrides": {"data.seq_len": 128}}],
    )
    spec = load_spec(path, ["train.seed=7", "ext.train.seed=8"], name="renamed")
    assert spec.name == "renamed"
    assert spec.config(spec.points[0], {}).train.seed == 7
    assert spec.config(spec.points[0], {}, spec.stages[0]).train.seed == 8
    assert spec.digest() != load_spec(path).digest()  # the overrides are part of the sweep
    for args, needle in (
        (["train.lr=1"], "train.lr: swept by"),
        (["model.windw=3"], "command line.model.windw"),
        (["seed"], "dotted.key=value"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["sweep", "run", str(path), *args, "--dry-run"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_storage_uris_go_to_tune_unchanged(tmp_path):
    from sweeps.driver import storage_root

    assert storage_root("s3://bucket/x") == "s3://bucket/x"
    assert storage_root("file:///tmp/r") == "file:///tmp/r"
    assert storage_root("rel") == str(Path("rel").absolute())


def test_optuna_sweep_in_a_file_uri_store_then_an_edited_spec_is_refused(
    tmp_path, corpus, ray_cluster, capsys
):
    from ttt.cli import main

    path = write_spec(
        tmp_path / "opt.yaml",
        corpus,
        name="opt",
        num_samples=2,
        search_alg="optuna",
        search={"model.mixer": "swa", "train.lr": {"loguniform": [1e-4, 1e-2]}},
        stop={"steps": 2},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = (tmp_path / "ray store").as_uri()
    argv = [
        "sweep",
        "run",
        str(path),
        "train.seed=3",
        "--name",
        "opt-b",
        "--tracking-uri",
        uri,
        "--storage-path",
        store,
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert "stage main: 2 finished" in out
    assert (tmp_path / "ray store" / "opt-b").is_dir()  # the URI's folder, not ./file:
    assert not list(Path.cwd().glob("file:*"))
    c, parents, children = mlflow_runs(uri, "opt-b")
    assert len(children) == 2
    assert {r.data.params["train.seed"] for r in children} == {"3"}
    assert len({r.data.params["train.lr"] for r in children}) == 2  # Optuna's own picks
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "status", "opt-b", "--tracking-uri", uri])
    status = capsys.readouterr().out
    assert exc.value.code == 0, status
    assert {r.info.run_id for r in children} <= set(status.split())
    # The same name with other overrides is another sweep: refused, before Ray is touched.
    with pytest.raises(SystemExit) as exc:
        main([*argv[:3], "train.seed=4", *argv[4:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "changed since it started" in err[-1] and "--name" in err[-1]


def test_small_scale_in_miniature_draws_fig1_with_both_lengths(
    tmp_path, corpus, ray_cluster, capsys
):
    """sweeps/small_scale.yaml end to end, shrunk (pico, one seed, a few steps, the same
    methods and the same extension stage): `ttt plots -e NAME` draws Fig 1 with both
    context lengths for every method, from the runs the sweep really logged."""
    import polars as pl

    from ttt.cli import main

    raw = yaml.safe_load((Path(__file__).parent.parent / "sweeps/small_scale.yaml").read_text())
    raw["base"] = {"config": "pico", "overrides": [*PICO_SWEEP, f"data.source={corpus}"]}
    raw.update(name="mini", stop={"steps": 2}, report_every=1, checkpoint_every=0)
    raw.update(resources={"cpu": 0.5}, max_concurrent=4)  # pico trials: four at a time
    raw["search"]["train.seed"] = {"grid": [0]}
    (stage,) = raw["stages"]
    stage.update(steps=1, overrides={"data.seq_len": 128, "data.batch_size": 2})
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "run", str(path), "--tracking-uri", uri, "--storage-path", str(tmp_path)])
    assert exc.value.code == 0
    capsys.readouterr()
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as exc:
        main(["plots", "-e", "mini", "--tracking-uri", uri, "--out", str(out)])
    assert "fig1_context_length: " in capsys.readouterr().out
    table = pl.read_parquet(out / "fig1_context_length.parquet")
    points = {(r["method"], r["data.seq_len"]) for r in table.iter_rows(named=True)}
    methods = ("full", "swa", "hybrid", "gated_deltanet", "mamba2", "ttt_e2e", "ttt_e2e (meta off)")
    assert points == {(m, t) for m in methods for t in (64, 128)}
