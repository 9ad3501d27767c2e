"""A sweep launches from one request: what `ttt sweep run` was asked, as a frozen value.

The CLI parses its arguments into a `SweepRequest` and calls `launch`. As a Ray job (the
default) the request travels as JSON to the job's entry point, `python -m sweeps.launch
REQUEST`, which drives the sweep; in a process that is already connected to Ray (a
notebook, a test) or with `--foreground` the driver runs in-process. Nothing rebuilds a
command line and no environment variable picks the mode.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sweeps.spec import load_spec
from ttt import process
from ttt.entry import run_entry
from ttt.errors import UserError
from ttt.tracking import announce, check_uri, resolve_uri


@dataclass(frozen=True)
class SweepRequest:
    spec_path: str
    overrides: tuple[str, ...] = ()
    name: str | None = None
    address: str | None = None  # an existing cluster; None: this machine's local one
    tracking_uri: str | None = None
    storage_path: str | None = None
    resume_errored: bool = False
    restart_errored: bool = False

    def __post_init__(self):
        if self.resume_errored and self.restart_errored:
            raise UserError("--resume-errored and --restart-errored: give one of them")

    def spec(self, dry_run: bool = False):
        """The parsed spec; `dry_run`: a missing dataset is a warning, not an error."""

        return load_spec(self.spec_path, list(self.overrides), self.name, dry_run=dry_run)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SweepRequest:
        raw = json.loads(text)
        return cls(**{**raw, "overrides": tuple(raw.get("overrides", ()))})


def launch(request: SweepRequest, *, foreground=False, detach=False, keep_cluster=False) -> int:
    """Run the sweep the request names; the exit code. As a Ray job unless `foreground`
    or this process is already connected to Ray."""
    import ray  # deferred: Ray loads only when a sweep starts (not for --dry-run)

    if detach and foreground:
        raise UserError("--detach and --foreground: give one of them (--detach submits a job)")
    uri = resolve_uri(request.tracking_uri)
    announce(uri)  # the driver checks it before anything else
    request = dataclasses.replace(request, tracking_uri=uri)
    if foreground or ray.is_initialized():
        return drive(request)
    return submit(request, detach=detach, keep_cluster=keep_cluster)


def drive(request: SweepRequest) -> int:
    """The driver itself: run (or resume) every stage, print each stage's outcome."""
    from sweeps.driver import Rerun, run_sweep  # deferred: the driver loads Ray Tune

    spec = request.spec()
    rerun = Rerun(request.resume_errored, request.restart_errored)
    result = run_sweep(
        spec,
        address=request.address,
        tracking_uri=request.tracking_uri,
        storage_path=request.storage_path,
        rerun=rerun,
    )
    for stage in result.stages:
        counts = Counter(r["outcome"] for r in stage.rows)
        print(f"stage {stage.name}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
        done = [r for r in stage.rows if r.get(spec.metric) is not None]
        if done:
            best = (min if spec.mode == "min" else max)(done, key=lambda r: r[spec.metric])
            print(f"  best {spec.metric} {best[spec.metric]:.4f}: {best['config']}")
    print(f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    return 0


def submit(request: SweepRequest, *, detach: bool, keep_cluster: bool) -> int:
    """Submit the sweep as a Ray job named after it (or follow the one already running);
    the exit code of its driver, 0 when `detach`."""
    from sweeps import job  # deferred: Ray's job client
    from sweeps.cluster import local_cluster  # deferred: with Ray
    from sweeps.driver import check_init_from, storage_root  # deferred: the driver loads Ray Tune

    spec = request.spec()
    check_uri(request.tracking_uri)  # what the job would fail on first, said here in seconds
    check_init_from(spec)
    if request.address:
        cluster = job.cluster_at(request.address)
    else:
        cluster, started = local_cluster(keep=keep_cluster)
        if started:
            print(f"started a local Ray cluster (127.0.0.1 only): {cluster.gcs}", file=sys.stderr)
    same = job.running(cluster.client(), spec.name)
    if same:
        job_id = same[0].submission_id
        print(f"sweep {spec.name} is already running as Ray job {job_id}: following it")
    else:
        in_job = dataclasses.replace(
            request,
            spec_path=str(Path(request.spec_path).absolute()),
            name=spec.name,
            address=cluster.gcs,
            storage_path=storage_root(request.storage_path, spec),
        )
        job_id = job.submit(cluster, spec.name, in_job, local=not request.address)
    print(f"Ray job {job_id}: {cluster.dashboard}/#/jobs/{job_id}", file=sys.stderr)
    print(f"  stop it with: ttt sweep stop {spec.name}", file=sys.stderr)
    if detach:
        return 0
    return job.follow(cluster, job_id)


def main(argv: list[str]) -> int:
    """The Ray job's entry point: `python -m sweeps.launch REQUEST_JSON`."""
    process.ray_env()  # before anything imports Ray
    return run_entry(lambda: drive(SweepRequest.from_json(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
