"""Beyond one machine: cluster definitions, `ttt tracking serve`, and a sweep on a two-node
Ray cluster (both nodes on 127.0.0.1) tracked by one MLflow server."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster"


RAY = str(Path(sys.executable).parent / "ray")  # the venv's own CLI, PATH or not
# Ray >= 2.59 turns token auth on for a local head; joining nodes and drivers use it too
# (the token is in ~/.ray/auth_token). Both nodes run on this machine; Ray itself maps the
# driver's 127.0.0.1 address to the machine's own node IP, which never leaves the host.
LOOPBACK_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


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


@pytest.fixture
def two_nodes(tmp_path):
    """Two Ray nodes with their own short temp dir, so teardown stops exactly them (a
    `ray stop` would also stop any other Ray cluster on the machine)."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="ttt-ray-", dir="/tmp")  # unix socket paths are short
    port = free_port()
    env = LOOPBACK_ENV
    common = ["--num-cpus", "1", "--disable-usage-stats", "--temp-dir", temp]
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--resources",
            '{"node_a": 1}',
            *common,
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--address",
                f"127.0.0.1:{port}",
                "--resources",
                '{"node_b": 1}',
                *common,
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=120,
        )
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], capture_output=True, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def tracking_server(tmp_path):
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


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_two_nodes_with_one_tracking_server(tmp_path, corpus, two_nodes, tracking_server):
    from mlflow.tracking import MlflowClient

    spec = tmp_path / "two.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "two-nodes",
                "base": {
                    "config": "pico",
                    "overrides": [
                        "data.seq_len=64",
                        "ttt.chunk=16",
                        "model.window=24",
                        "data.batch_size=4",
                        "train.eval_batches=1",
                        f"data.source={corpus}",
                        "model.mixer=swa",
                    ],
                },
                "search": {"train.lr": {"grid": [3e-3, 2e-3, 1e-3, 5e-4]}},
                "stop": {"steps": 3},
                "report_every": 1,
                "max_concurrent": 2,
                "resources": {"cpu": 1},
            }
        )
    )
    env = {**LOOPBACK_ENV, "TTT_TUNE_VERBOSE": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ttt.cli",
            "sweep",
            "run",
            str(spec),
            "--address",
            two_nodes,
            "--tracking-uri",
            tracking_server,
            "--storage-path",
            str(tmp_path / "ray"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, "\n".join(
        ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln
    )[-3000:]
    c = MlflowClient(tracking_server)
    exp = c.get_experiment_by_name("two-nodes")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("ttt.role") == "trial"]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["ttt.node_id"] for r in children}) == 2  # both nodes ran trials
    for r in children:  # artifacts went through the server too
        assert [a.path for a in c.list_artifacts(r.info.run_id, "eval")] == [
            "eval/nll_by_position.parquet"
        ]
    assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to a local store
