"""Beyond one machine: cluster definitions, `ttt tracking serve`, and a sweep on a two-node
Ray cluster (both nodes on 127.0.0.1) tracked by one MLflow server."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import write_sweep_spec

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"


RAY = str(Path(sys.executable).parent / "ray")  # the venv's own CLI, PATH or not


# Ray >= 2.59 turns token auth on for a local head; joining nodes and drivers use it too
# (the token is in ~/.ray/auth_token). Both nodes run on this machine; Ray itself maps the
# driver's 127.0.0.1 address to the machine's own node IP, which never leaves the host.
# Read when a cluster starts, after conftest points the caches at this session's folder.
def loopback_env() -> dict:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_launcher_yaml_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert set(cfg["available_node_types"]) == {"head", "gpu_worker"}
    assert any("pip install -e ~/ttt-e2e" in c for c in cfg["setup_commands"])
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "ttt sweep run" in text and "storage-path" in text


def test_kuberay_manifest_and_slurm_script():
    k = yaml.safe_load((CLUSTER / "kuberay.yaml").read_text())
    assert (k["apiVersion"], k["kind"]) == ("ray.io/v1", "RayCluster")
    head = k["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "pip install -e /shared/ttt-e2e" in head["lifecycle"]["postStart"]["exec"]["command"][2]
    assert k["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert "ttt sweep run" in (CLUSTER / "kuberay.yaml").read_text()
    slurm = CLUSTER / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(slurm)], check=True)  # parses
    text = slurm.read_text()
    assert "ray start --head" in text and 'ttt sweep run "$SPEC" --address' in text
    assert "pip install -e ." in text


def test_tracking_serve_binds_loopback_and_warns_otherwise(monkeypatch, capsys):
    from ttt.cli import main

    calls = []
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append(args))
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        with pytest.raises(SystemExit):
            main(["tracking", "serve", "--host", host, "--port", "5123"])
        args = calls.pop()
        assert args[args.index("--host") + 1] == host and "--serve-artifacts" in args
        assert ("no authentication" in capsys.readouterr().err) == warned


def test_an_untested_ray_is_one_line(monkeypatch):
    from importlib import metadata

    from sweeps.ray_compat import TESTED, check_version
    from ttt.errors import UserError

    monkeypatch.delenv("TTT_UNTESTED_RAY", raising=False)
    assert check_version() == metadata.version("ray")
    lo, hi = TESTED
    for version in (f"{lo[0]}.{lo[1] - 1}.0", f"{hi[0]}.{hi[1] + 1}.0rc1", "3.0.0"):
        with pytest.raises(UserError, match=f"Ray {version} is installed.*TTT_UNTESTED_RAY"):
            check_version(version)
    monkeypatch.setenv("TTT_UNTESTED_RAY", "1")
    assert check_version("3.0.0") == "3.0.0"


def test_a_token_is_made_for_a_local_cluster_and_never_for_a_remote_one(tmp_path, monkeypatch):
    """A new machine has no ~/.ray/auth_token: the local cluster's start makes one with
    Ray's own generator; joining someone else's cluster (--address) invents none."""
    from sweeps.driver import connect_env
    from sweeps.ray_compat import SINGLE_MACHINE, default_token_path, ensure_token, token_source
    from ttt.errors import UserError

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    # Joining a loopback address switches this process to single-machine mode: undone
    # after the test, or the two-node cluster below could not take its second node.
    # (setenv, not delenv: delenv of an absent variable would restore nothing.)
    monkeypatch.setenv(SINGLE_MACHINE[0], "1")  # Ray's default on Linux: clusters allowed
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    assert token_source() is None
    with socket.socket() as listener:  # a "remote" cluster's GCS port
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(UserError, match="no Ray auth token here"):
            connect_env(f"127.0.0.1:{port}")
    assert not (tmp_path / ".ray").exists()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH=.*no such file"):
        ensure_token()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    created = ensure_token()
    assert created == default_token_path() == tmp_path / ".ray" / "auth_token"
    token = created.read_text().strip()
    assert len(token) >= 32 and token_source() == str(created)
    assert ensure_token() is None and created.read_text().strip() == token  # kept
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    assert token_source() == "$RAY_AUTH_TOKEN"


def test_each_interpreter_and_code_tree_gets_its_own_local_cluster(monkeypatch):
    """A cluster's workers run the Python that started it: a sweep from another checkout
    or environment must not land on it (it would run the other tree's code)."""
    from sweeps import cluster

    monkeypatch.delenv("TTT_RAY_DIR", raising=False)
    mine = cluster.cluster_dir()
    monkeypatch.setattr(sys, "executable", "/elsewhere/.venv/bin/python3")
    other = cluster.cluster_dir()
    assert mine != other and mine.parent == other.parent == Path("/tmp")
    assert len(str(other)) < 40  # Ray's socket paths under it must fit in 107 bytes
    monkeypatch.setenv("TTT_RAY_DIR", "/tmp/rt-mine")
    assert cluster.cluster_dir() == Path("/tmp/rt-mine")


def test_a_stopping_cluster_gets_no_new_work_and_a_new_one_waits_for_it(tmp_path, monkeypatch):
    """The idle keeper marks the cluster stopping before it drains (about 30 s): a sweep
    started then waits for it to go and starts a new one, instead of submitting a job that
    fails with no reason."""
    import json
    import subprocess
    import time

    from sweeps import cluster

    monkeypatch.setenv("TTT_RAY_DIR", str(tmp_path))
    # The keeper taking Ray down, as another process's child (so no zombie outlives it).
    spawn = ["sh", "-c", "sleep 2 >/dev/null 2>&1 & echo $!"]
    pid = int(subprocess.run(spawn, capture_output=True, text=True).stdout)
    state = {"gcs": "127.0.0.1:1", "dashboard": "http://127.0.0.1:1", "pid": pid}
    (tmp_path / "ttt-cluster.json").write_text(json.dumps({**state, "stopping": True}))
    assert cluster.find_local() is None
    t0 = time.monotonic()
    cluster._wait_for_stopping()
    assert not cluster._alive(pid) and time.monotonic() - t0 > 1


class TwoNodes:
    """A Ray head and a second node on this machine, each with one CPU and a custom
    resource of its own. The second node runs under `ray start --block` in a session of
    its own, so that `kill_worker` takes down exactly its processes (raylet, agents and
    every worker process it started) as a lost machine would."""

    def __init__(self, temp: str):
        self.temp, self.address, self.worker = temp, "", None

    def start(self) -> None:
        from sweeps.ray_compat import ensure_token

        ensure_token()  # `ray start` makes none, and a new machine (CI's HOME) has none
        port = free_port()
        common = ["--num-cpus", "1", "--disable-usage-stats", "--temp-dir", self.temp]
        subprocess.run(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false"]
            + ["--resources", '{"node_a": 1}', *common],
            check=True,
            env=loopback_env(),
            capture_output=True,
            timeout=120,
        )
        self.address = f"127.0.0.1:{port}"
        self.worker = subprocess.Popen(
            [RAY, "start", "--block", "--address", self.address]
            + ["--resources", '{"node_b": 1}', *common],
            env=loopback_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while not self._joined():
            assert time.time() < deadline, "the second Ray node did not join"
            time.sleep(2)

    def _joined(self) -> bool:
        status = subprocess.run(
            [RAY, "status", "--address", self.address],
            env=loopback_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return "node_b" in status.stdout

    def worker_open_files(self, containing: str) -> list[Path]:
        """Files that the second node's processes hold open, whose path contains `containing`."""
        pids = subprocess.run(
            ["pgrep", "-s", str(self.worker.pid)], capture_output=True, text=True, timeout=60
        ).stdout.split()
        found = set()
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").glob("*"):
                try:
                    target = os.readlink(fd)
                except OSError:  # the process or the descriptor is gone
                    continue
                if containing in target:
                    found.add(Path(target))
        return sorted(found)

    def kill_worker(self) -> None:
        subprocess.run(["pkill", "-9", "-s", str(self.worker.pid)], timeout=60)
        self.worker.wait(timeout=60)

    def stop(self) -> None:
        import shutil

        if self.worker is not None:
            subprocess.run(["pkill", "-9", "-s", str(self.worker.pid)], timeout=60)
        subprocess.run(["pkill", "-9", "-f", self.temp], capture_output=True, timeout=60)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    """One cluster for this module's tests; the node-loss test, which kills the second
    node, comes last. Teardown stops exactly this cluster (by its own short temp dir): a
    `ray stop` would also stop any other Ray cluster on the machine."""
    nodes = TwoNodes(tempfile.mkdtemp(prefix="ttt-ray-", dir="/tmp"))  # short socket paths
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """One `ttt tracking serve` for this module's tests (each test has an experiment of
    its own): the server takes tens of seconds to start on two cores."""
    tmp_path = tmp_path_factory.mktemp("tracking")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ttt.cli",
            "tracking",
            "serve",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the tracking server did not come up")
    yield url
    os.killpg(proc.pid, 9)
    proc.wait()


def write_spec(path: Path, corpus, **fields) -> Path:
    return write_sweep_spec(path, corpus, "model.mixer=swa", **fields)


def start_sweep(spec: Path, nodes: TwoNodes, tracking_uri: str, cwd: Path) -> subprocess.Popen:
    # No RAY_AUTH_MODE for the driver: it finds the head's ~/.ray/auth_token by itself.
    env = {**loopback_env(), "TTT_TUNE_VERBOSE": "0"}
    env.pop("RAY_AUTH_MODE")
    return subprocess.Popen(
        [sys.executable, "-m", "ttt.cli", "sweep", "run", str(spec), "--address", nodes.address]
        + ["--tracking-uri", tracking_uri, "--storage-path", str(cwd / "ray")]
        # this head runs no dashboard, so it takes no jobs: drive the sweep from here
        + ["--foreground"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, "\n".join(
        ln for ln in err.splitlines() if "Error" in ln or "error" in ln
    )[-3000:]


def trial_runs(tracking_uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("ttt.role") == "trial"]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_two_nodes_with_one_tracking_server(tmp_path, corpus, two_nodes, tracking_server):
    from mlflow.tracking import MlflowClient

    spec = write_spec(
        tmp_path / "two.yaml",
        corpus,
        name="two-nodes",
        search={"train.lr": {"grid": [3e-3, 2e-3, 1e-3, 5e-4]}},
        stop={"steps": 3},
        max_concurrent=2,
        resources={"cpu": 1},
    )
    finish(start_sweep(spec, two_nodes, tracking_server, tmp_path))
    c = MlflowClient(tracking_server)
    children = trial_runs(tracking_server, "two-nodes")
    assert len(children) == 4, children
    assert all(r.info.status == "FINISHED" for r in children), [
        (r.info.status, r.data.tags.get("ttt.outcome"), r.data.tags.get("ttt.message"))
        for r in children
    ]
    assert len({r.data.tags["ttt.node_id"] for r in children}) == 2  # both nodes ran trials
    for r in children:  # artifacts went through the server too
        assert [a.path for a in c.list_artifacts(r.info.run_id, "eval")] == [
            "eval/nll_by_position.parquet",
            "eval/nll_by_position.png",
            "eval/nll_by_position_binned.csv",
            "eval/nll_by_position_bins.parquet",
        ]
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to a local store


@pytest.mark.ray
@pytest.mark.slow
def test_one_trial_on_two_nodes_matches_one_process(tmp_path, corpus, two_nodes, tracking_server):
    """`resources: {nodes: 2}`: Ray places the trial's two JAX processes on the two nodes
    (placement group, one bundle per node); they train as one data-parallel run and follow
    the loss trajectory of a single process with the same global batch."""
    from mlflow.tracking import MlflowClient

    from sweeps.spec import load_spec
    from ttt.train import run

    spec = write_spec(
        tmp_path / "multi.yaml",
        corpus,
        name="multi-node",
        stop={"steps": 5},
        resources={"nodes": 2, "cpu": 1},
    )
    finish(start_sweep(spec, two_nodes, tracking_server, tmp_path))
    (child,) = trial_runs(tracking_server, "multi-node")
    assert child.info.status == "FINISHED" and child.data.tags["ttt.processes"] == "2"
    history = MlflowClient(tracking_server).get_metric_history(child.info.run_id, "loss")
    multi = {m.step: m.value for m in history}

    loaded = load_spec(str(spec))
    single = run(loaded.config(loaded.points[0], {}), tmp_path / "single", progress=False)
    assert single.status == "finished"
    lines = (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()
    want = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
    assert sorted(multi) == sorted(want) == [1, 2, 3, 4, 5]
    assert max(abs(multi[s] - want[s]) for s in want) < 1e-5


@pytest.mark.ray
@pytest.mark.slow
def test_losing_a_node_fails_its_trial_over(tmp_path, corpus, two_nodes, tracking_server):
    """Killing every Ray process of the second node mid-sweep: its trial fails, Tune
    retries it on the head from its last checkpoint, and MLflow ends with one finished
    child run per trial."""
    spec = write_spec(
        tmp_path / "loss.yaml",
        corpus,
        name="node-loss",
        search={"train.lr": {"grid": [3e-3, 1e-3]}},
        stop={"steps": 150},
        checkpoint_every=20,
        max_failures=2,
        resources={"cpu": 1},
    )
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_server)

    def last_step(run) -> int:
        return max((m.step for m in c.get_metric_history(run.info.run_id, "loss")), default=0)

    def last_local_step(f: Path) -> int:
        try:
            lines = f.read_text().splitlines()[-3:]
        except FileNotFoundError:  # the trial ended between the listing and the read
            return 0
        return max((json.loads(ln).get("step", 0) for ln in lines if ln), default=0)

    # The moment of the kill comes from the second node's own trial: the metrics file its
    # trainer holds open (and flushes every step) in the node-local scratch folder
    # (sweeps/trial.py). MLflow lags behind the trials by the driver's queue of results,
    # and the two trials start and end at different times on a loaded machine.
    proc = start_sweep(spec, two_nodes, tracking_server, tmp_path)
    deadline = time.time() + 400
    while True:  # the second node's trial well past its first checkpoint
        assert proc.poll() is None and time.time() < deadline, "sweep ended before the kill"
        held = two_nodes.worker_open_files("/ttt-trials/node-loss/")
        steps = [last_local_step(f) for f in held if f.name == "metrics.jsonl"]
        if steps and steps[0] >= 50:
            break
        time.sleep(0.2)
    two_nodes.kill_worker()
    assert steps[0] < 150, f"the second node's trial finished before the kill: {steps}"
    finish(proc)

    runs = trial_runs(tracking_server, "node-loss")
    assert len(runs) == 2 and len({r.data.tags["ttt.trial_id"] for r in runs}) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    moved = [r for r in runs if r.data.tags.get("ttt.retries")]
    assert len(moved) == 1, [r.data.tags for r in runs]
    tags = moved[0].data.tags
    assert len(tags["ttt.node_ids"].split(",")) == 2  # the lost node, then the head
    # From a checkpoint, not from scratch. Which one depends on how far Tune had taken in
    # the trial's reports when the node died: at least the one at step 20.
    resumed = int(tags["ttt.resumed_from"])
    assert resumed >= 20 and resumed % 20 == 0, resumed
    assert all(last_step(r) == 150 for r in runs)


def test_trials_waiting_for_cpus_held_by_another_sweep_say_so(monkeypatch, capsys, tmp_path):
    import ray
    from conftest import PICO_SWEEP

    import sweeps.driver
    from sweeps.driver import say_if_waiting
    from sweeps.spec import load_spec

    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "second",
                "base": {"config": "pico", "overrides": PICO_SWEEP},
                "resources": {"cpu": 2},
            }
        )  # fmt: skip
    )
    spec = load_spec(spec_path)

    class Job:
        metadata, status, submission_id = {"ttt.sweep": "first"}, "RUNNING", "first-1"

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(sweeps.driver, "list_jobs", lambda **kw: [Job()])  # where it is called
    say_if_waiting(spec)
    err = capsys.readouterr().err
    assert "sweep second: its trials wait for 2 CPU each; the cluster has 1 free" in err
    assert "(held by sweep first)" in err
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})
    say_if_waiting(spec)
    assert capsys.readouterr().err == ""
