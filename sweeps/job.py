"""A sweep as a Ray job: submitted through the Job Submission API, so that the dashboard's
Jobs page lists it under the sweep's name with its driver's log, and so that it goes on
when the terminal that started it closes. `ttt sweep run` follows its log; `ttt sweep
stop NAME` stops it (the driver marks its MLflow runs KILLED; running it again resumes).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time

from sweeps.cluster import STOP_ENV, Cluster, find_local
from sweeps.ray_compat import loopback_env
from ttt.errors import UserError

# What a job's driver needs from the submitting shell: the cluster may have been started
# from another one.
FORWARD = ("TTT_", "MLFLOW_", "JAX_", "XLA_", "CUDA_VISIBLE_DEVICES", "TOKENIZERS_", "HF_")
SWEEP_KEY = "ttt.sweep"  # job metadata: which sweep a job runs


def cluster_at(address: str) -> Cluster:
    """An existing cluster's dashboard, asked of the cluster itself."""
    import ray  # deferred: Ray loads only where a cluster is joined

    from sweeps.driver import connect_env, init_error  # deferred: the driver loads Ray Tune

    connect_env(address)
    try:
        context = ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise init_error(address, e) from None
    url = context.dashboard_url
    ray.shutdown()
    if not url:
        raise UserError(
            f"--address={address}: that cluster runs no dashboard, so it takes no jobs; start "
            "its head with --include-dashboard=true, or give --foreground to drive the sweep "
            "from this terminal"
        )
    return Cluster(address, f"http://{url}")


def running(client, name: str | None = None) -> list:
    """The cluster's sweep jobs that have not ended (of one sweep, given its name)."""
    return [
        j
        for j in client.list_jobs()
        if not j.status.is_terminal()
        and SWEEP_KEY in (j.metadata or {})
        and (name is None or j.metadata[SWEEP_KEY] == name)
    ]


# How long a submission waits for the cluster's job agent (Ray answers "try again later").
SUBMIT_WAIT_S = 120.0
NO_AGENT = "No available agent to submit job"


def submit(cluster: Cluster, name: str, request, local: bool) -> str:
    """Submit the sweep's `SweepRequest` as a job named after the sweep: its entry point
    reads the request and drives the sweep (`sweeps/launch.py`)."""
    entrypoint = (
        f"cd {shlex.quote(os.getcwd())} && exec {shlex.quote(sys.executable)} -m sweeps.launch "
        + shlex.quote(request.to_json())
    )
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD)}
    env.update(STOP_ENV)
    if local:
        env.update(loopback_env())
    client = cluster.client()
    deadline = time.monotonic() + SUBMIT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                submission_id=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                metadata={SWEEP_KEY: name, "job_name": name},
                runtime_env={"env_vars": env},
            )
        except RuntimeError as e:
            # A cluster that has just started (or a loaded machine) answers 500 "No
            # available agent" until its dashboard agent registers; Ray says to retry.
            if NO_AGENT not in str(e):
                raise
            if time.monotonic() > deadline:
                raise UserError(
                    f"the Ray cluster at {cluster.dashboard} took no job for {SUBMIT_WAIT_S:.0f} s "
                    f"({NO_AGENT}); run the same command again"
                ) from None
            time.sleep(2.0)


def follow(cluster: Cluster, job_id: str) -> int:
    """Print the job's log as it grows until the job ends; its driver's exit code. Ctrl-C
    stops following, not the sweep."""
    client = cluster.client()

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the sweep goes on as Ray job {job_id} "
            f"({cluster.dashboard}/#/jobs/{job_id}). The same `ttt sweep run` follows it "
            "again; `ttt sweep stop` ends it.",
            file=sys.stderr,
        )
        return 130
    info = client.get_job_info(job_id)
    status = info.status.value
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    why = ""
    if status == "FAILED" and info.message:  # e.g. the driver could not even be scheduled
        first = info.message.strip().splitlines()[0]
        why = f": {first[:300]}"
    print(f"Ray job {job_id}: {status}{why}", file=sys.stderr)
    if status == "STOPPED":
        return 1
    return code if isinstance(code, int) and code > 0 else 1


def stop(name: str, address: str | None) -> list[str]:
    """Stop sweep `name`'s running job(s); wait for their drivers to finish."""
    cluster = cluster_at(address) if address else find_local()
    if cluster is None:
        raise UserError(f"sweep {name!r}: no local Ray cluster is running, so nothing to stop")
    client = cluster.client()
    jobs = running(client, name)
    if not jobs:
        others = sorted({j.metadata[SWEEP_KEY] for j in running(client)})
        raise UserError(
            f"sweep {name!r} is not running on {cluster.dashboard} "
            f"(running: {', '.join(others) or 'none'})"
        )
    ids = [j.submission_id for j in jobs]
    for job_id in ids:
        client.stop_job(job_id)
    deadline = time.time() + 180
    while time.time() < deadline:
        if all(client.get_job_status(i).is_terminal() for i in ids):
            break
        time.sleep(1)
    return ids
