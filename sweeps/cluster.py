"""The local Ray cluster that `ttt sweep run` submits sweeps to, as Ray jobs.

One such cluster per machine and user, shared by every sweep started there: a keeper
process (`python -m sweeps.cluster DIR`) runs `ray start --head --block` and stops it
when no sweep has been running for a while, unless a sweep asked to keep it
(`--keep-cluster`). Every Ray service of it listens on 127.0.0.1 only, on ports chosen
free at start, and other machines cannot join it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import ttt
from sweeps.ray_compat import ensure_token, loopback_env, ray_cli, token_auth
from ttt import process
from ttt.errors import UserError
from ttt.settings import settings

IDLE_S = 20  # with no job running this long (and none asked to keep it), the cluster stops
FIRST_JOB_S = 180  # a cluster that never got a job stops after this
KEEPER_PATIENCE_S = 120  # a cluster whose jobs cannot be listed this long is taken down
# A stopped sweep's driver gets SIGINT (what Tune stops on) and this long to mark its
# MLflow runs and save Tune's state before Ray kills it.
STOP_ENV = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "90"}


def owner() -> str:
    """The interpreter and code tree a local cluster runs trials with: its raylet starts
    workers with the Python that started it, which imports the code installed there. A
    sweep from another checkout or environment gets a cluster of its own, never one that
    would run someone else's code."""

    tree = Path(ttt.__file__).resolve().parent.parent
    return hashlib.sha256(f"{sys.executable}\0{tree}".encode()).hexdigest()[:8]


def cluster_dir() -> Path:
    """Ray's temp dir for this cluster (short: Ray's socket paths must fit in 107 bytes):
    one per user, interpreter and code tree (`owner`), or `$TTT_RAY_DIR`."""
    return Path(settings().ray_dir or f"/tmp/ray-ttt-{os.getuid()}-{owner()}")


def loopback_only(port: int) -> bool:
    """Whether the cluster whose GCS is on 127.0.0.1:`port` is one of these loopback-only
    clusters (a cluster Ray started the usual way listens on the machine's address too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it picks the outward address
            outward = probe.getsockname()[0]
        except OSError:
            return True  # no other address than loopback
    if outward.startswith("127."):
        return True
    try:
        with socket.create_connection((outward, port), timeout=2):
            return False
    except OSError:
        return True


@dataclass
class Cluster:
    gcs: str  # HOST:PORT, for ray.init
    dashboard: str  # http://HOST:PORT, the dashboard and the Job Submission API
    pid: int = 0  # the keeper's, for a local cluster
    keep: bool = False
    stopping: bool = False  # the keeper is taking it down: no new work goes to it
    python: str = ""  # the interpreter its workers run

    def client(self):
        # deferred: Ray loads only where a job is submitted
        from ray.job_submission import JobSubmissionClient

        token_auth()
        return JobSubmissionClient(self.dashboard)


def _state() -> Path:
    return cluster_dir() / "ttt-cluster.json"


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=3)
        return True
    except urllib.error.HTTPError:
        return True  # 401 without a token: it is up
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _read_state() -> Cluster | None:
    try:
        return Cluster(**json.loads(_state().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def find_local() -> Cluster | None:
    """The local cluster that can take a sweep now: up, answering, and not stopping."""
    cluster = _read_state()
    if cluster is None or cluster.stopping:
        return None
    return cluster if _alive(cluster.pid) and _answers(cluster.dashboard) else None


def _wait_for_stopping(timeout: float = 120) -> None:
    """A cluster that began stopping (idle, or `--down`) drains for up to a minute; a new
    one in the same folder starts once its keeper has gone."""
    cluster = _read_state()
    if cluster is None or not cluster.stopping:
        return
    print("the local Ray cluster is stopping; a new one starts once it is down", file=sys.stderr)
    deadline = time.time() + timeout
    while _alive(cluster.pid) and time.time() < deadline:
        time.sleep(0.5)
    if _alive(cluster.pid):
        raise UserError(
            f"the local Ray cluster (keeper pid {cluster.pid}) did not stop in {timeout:.0f} s; "
            "run `ttt sweep cluster --down` and try again"
        )


def local_cluster(keep: bool = False, timeout: float = 120) -> tuple[Cluster, bool]:
    """This machine's ttt cluster, started if none runs; (cluster, started here). Two
    sweeps started at once get the same one."""

    cluster_dir().mkdir(parents=True, exist_ok=True)
    with open(cluster_dir() / "ttt-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _local_cluster(keep, timeout)


def _local_cluster(keep: bool, timeout: float) -> tuple[Cluster, bool]:
    cluster = find_local()
    if cluster is not None:
        if keep and not cluster.keep:
            cluster.keep = True
            _state().write_text(json.dumps(asdict(cluster)))
        return cluster, False
    _wait_for_stopping()
    directory = cluster_dir()
    _state().unlink(missing_ok=True)
    created = ensure_token()  # `ray start` wants one and, unlike ray.init(), makes none
    if created is not None:
        print(f"created a Ray auth token for the local cluster in {created}", file=sys.stderr)
    log = (directory / "ttt-cluster.log").open("ab")
    cmd = [sys.executable, "-m", "sweeps.cluster", str(directory)] + (["--keep"] if keep else [])
    keeper = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives this terminal
        env={**os.environ, **loopback_env()},
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        cluster = find_local()
        if cluster is not None:
            return cluster, True
        if keeper.poll() is not None:
            break
        time.sleep(0.5)
    keeper.kill()
    tail = (directory / "ttt-cluster.log").read_text(errors="replace").strip().splitlines()
    raise UserError(
        f"the local Ray cluster did not start (log {directory / 'ttt-cluster.log'}): "
        + (tail[-1] if tail else "no output")
    )


def stop_local(cluster: Cluster | None = None) -> bool:
    """Stop the local cluster (the one given, else the one running); False if none runs."""
    cluster = cluster or find_local()
    if cluster is None:
        return False
    os.kill(cluster.pid, signal.SIGTERM)
    deadline = time.time() + 60
    while _alive(cluster.pid) and time.time() < deadline:
        time.sleep(0.5)
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keeper(directory: Path, keep: bool) -> None:
    """Run `ray start --head --block` and watch it: stop it when idle (unless kept), or on
    SIGTERM; remove the state file either way."""
    port, dashboard = _free_port(), _free_port()
    env = {
        **os.environ,
        **loopback_env(),
        **STOP_ENV,
        # fixed by default in Ray: two clusters on one machine would collide on them
        "AUTOSCALER_METRIC_PORT": str(_free_port()),
        "DASHBOARD_METRIC_PORT": str(_free_port()),
    }
    ray = ray_cli("start", "--head", "--block")
    proc = subprocess.Popen(
        ray
        + ["--port", str(port), "--dashboard-host", "127.0.0.1"]
        + ["--dashboard-port", str(dashboard)]
        + ["--dashboard-agent-listen-port", str(_free_port())]
        # 10001 by default: a second cluster on the machine would fail to bind it
        + ["--ray-client-server-port", str(_free_port())]
        + ["--temp-dir", str(directory), "--disable-usage-stats"],
        env=env,
    )
    state = directory / "ttt-cluster.json"

    def down(*_):
        try:  # first: no one hands it new work while it drains
            stopping = json.loads(state.read_text())
            state.write_text(json.dumps({**stopping, "stopping": True}))
        except (OSError, ValueError):
            pass
        proc.send_signal(signal.SIGTERM)  # Ray drains and stops every process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        state.unlink(missing_ok=True)
        sys.exit(0)

    process.set_signal_handlers({signal.SIGTERM: down, signal.SIGINT: down})
    cluster = Cluster(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", os.getpid(), keep,
        python=sys.executable,
    )  # fmt: skip
    while not _answers(cluster.dashboard):
        if proc.poll() is not None:
            sys.exit(f"ray start exited with {proc.returncode}")
        time.sleep(0.5)
    state.write_text(json.dumps(asdict(cluster)))
    print(f"local Ray cluster {cluster.gcs}, dashboard {cluster.dashboard}", flush=True)
    started, idle_since, client, failures = time.time(), None, None, 0
    while proc.poll() is None:
        time.sleep(2)
        try:
            keep = json.loads(state.read_text()).get("keep", keep)
            client = client or cluster.client()
            jobs = client.list_jobs()
            failures = 0
        # The dashboard restarting (requests' errors are OSErrors; the job client raises
        # RuntimeError for an error status), or the state file caught mid-rewrite.
        except (OSError, ValueError, RuntimeError) as e:
            failures += 1
            if failures == 1:
                print(f"cannot list the cluster's jobs ({type(e).__name__}: {e})", flush=True)
            if failures * 2 >= KEEPER_PATIENCE_S and not keep:
                print(f"no answer for {KEEPER_PATIENCE_S} s: stopping the cluster", flush=True)
                down()
            continue
        if keep:
            continue
        running = [j for j in jobs if not j.status.is_terminal()]
        if running or (not jobs and time.time() - started < FIRST_JOB_S):
            idle_since = None
            continue
        idle_since = idle_since or time.time()
        if time.time() - idle_since > IDLE_S:
            print("no sweep running: stopping the local Ray cluster", flush=True)
            down()
    state.unlink(missing_ok=True)
    sys.exit(f"ray start exited with {proc.returncode}")


if __name__ == "__main__":
    keeper(Path(sys.argv[1]), "--keep" in sys.argv[2:])
