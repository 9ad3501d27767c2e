"""`ttt sweep run|status|ls`: thin wrappers over the `sweeps` package."""

from __future__ import annotations

from pathlib import Path

import typer

from ttt import process
from ttt.cli import options
from ttt.errors import UserError

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

app = typer.Typer(help="Run sweeps on Ray Tune, tracked in MLflow.", no_args_is_help=True)


@app.callback()
def _before_ray() -> None:
    """Every `ttt sweep` command may import Ray: what it reads at import is set first."""
    process.ray_env()


_STORAGE = typer.Option(None, "--storage-path", help="Ray results folder (default ./ray_results).")


def dry_run_table(spec) -> str:
    from ttt.config import TRACED_KEYS, shape_key

    varying = sorted({k for p in spec.points for k in p})
    lines = [
        f"sweep {spec.name}: {len(spec.points)} grid point(s) x {spec.num_samples} "
        f"sample(s) = {len(spec.points) * spec.num_samples} trial(s)"
    ]
    for key, (kind, args) in spec.random.items():
        lines.append(f"  sampled: {key} ~ {kind}{args}")
    shapes: dict[tuple, int] = {}
    rows = []
    for i, point in enumerate(spec.points):
        cfg = spec.config(point, {})
        sid = shapes.setdefault(shape_key(cfg), len(shapes))
        rows.append(
            [str(i), *[str(point.get(k, "")) for k in varying], str(spec.num_samples), f"#{sid}"]
        )
    head = ["trial", *varying, "samples", "shape"]
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    lines += [fmt(head), *map(fmt, rows)]
    random_shapes = [k for k in spec.random if k not in TRACED_KEYS]
    note = f" (+ sampled shape keys: {', '.join(random_shapes)})" if random_shapes else ""
    lines.append(f"distinct compiled shapes: {len(shapes)}{note}")
    for stage in spec.stages:
        lines.append(f"stage {stage.name}: from {stage.start_from} with {stage.overrides}")
    return "\n".join(lines)


@app.command("run")
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A sweep spec (YAML)."),
    overrides: list[str] = typer.Argument(
        None,
        metavar="[dotted.key=value ...]",
        help="Override the spec's base config (STAGE.dotted.key=value: one stage's).",
    ),
    name: str = typer.Option(None, "--name", help="Run the spec under another sweep name."),
    address: str = typer.Option(
        None,
        "--address",
        help="An existing Ray cluster HOST:PORT (default: this machine's local cluster, "
        "started if none runs).",
    ),
    tracking_uri: str = options.tracking_uri(),
    storage_path: str = _STORAGE,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the trials, shapes, FLOPs, memory per replica and time; run nothing.",
    ),
    on: str = typer.Option(
        None,
        "--on",
        metavar="ACCELERATORS",
        help="With --dry-run: price the sweep on these, comma-separated (h100, h200, a100; "
        "default h200).",
    ),
    resume_errored: bool = typer.Option(
        False, "--resume-errored", help="On resume, continue errored trials from a checkpoint."
    ),
    restart_errored: bool = typer.Option(
        False, "--restart-errored", help="On resume, start errored trials again from scratch."
    ),
    foreground: bool = typer.Option(
        False,
        "--foreground",
        help="Drive the sweep from this process, not as a Ray job (it ends with the terminal).",
    ),
    detach: bool = typer.Option(
        False, "--detach", help="Submit the sweep's Ray job and return without following it."
    ),
    keep_cluster: bool = typer.Option(
        False,
        "--keep-cluster",
        help="Keep the local Ray cluster (and its dashboard) up after the sweep ends.",
    ),
) -> None:
    """Run (or resume) a sweep as a Ray job named after it, and follow its log. Re-running
    the same command resumes it (or follows it, while it runs)."""
    from sweeps.launch import SweepRequest, launch

    request = SweepRequest(
        spec_path=str(spec_path),
        overrides=tuple(overrides or ()),
        name=name,
        address=address,
        tracking_uri=tracking_uri,
        storage_path=storage_path,
        resume_errored=resume_errored,
        restart_errored=restart_errored,
    )
    if not dry_run:
        if on is not None:
            raise UserError("--on prices a dry run: add --dry-run")
        typer.echo(dry_run_table(request.spec()))
        raise typer.Exit(
            launch(request, foreground=foreground, detach=detach, keep_cluster=keep_cluster)
        )
    # deferred like every sweeps import here: the estimate loads JAX and the model's code
    from sweeps.cost import accelerators, cost_table

    keys = accelerators(on)  # a wrong name fails before anything is printed
    spec = request.spec(dry_run=True)
    typer.echo(dry_run_table(spec))
    for line in spec.warnings:
        typer.echo(f"warning: {line}; the dry run prices it anyway", err=True)
    typer.echo(cost_table(spec, keys))


@app.command("stop")
def stop(
    name: str = typer.Argument(..., metavar="NAME", help="Sweep name."),
    address: str = typer.Option(
        None, "--address", help="The Ray cluster HOST:PORT it runs on (default: the local one)."
    ),
) -> None:
    """Stop a running sweep: its trials stop, their MLflow runs are marked KILLED, and
    running it again resumes it."""
    from sweeps.job import stop as stop_sweep

    for job_id in stop_sweep(name, address):
        typer.echo(f"stopped sweep {name} (Ray job {job_id}); `ttt sweep run` resumes it")


@app.command("cluster")
def cluster(
    down: bool = typer.Option(False, "--down", help="Stop the local Ray cluster."),
) -> None:
    """The local Ray cluster that sweeps run on: its address, dashboard and sweeps."""
    from sweeps.cluster import find_local, stop_local
    from sweeps.job import SWEEP_KEY

    found = find_local()
    if found is None:
        typer.echo("no local Ray cluster is running (`ttt sweep run` starts one)")
        return
    if down:
        stop_local(found)
        typer.echo(f"stopped the local Ray cluster {found.gcs}")
        return
    keep = "kept up" if found.keep else "stops when no sweep has run for a while"
    typer.echo(f"local Ray cluster {found.gcs} ({keep}); dashboard {found.dashboard}")
    for j in found.client().list_jobs():
        sweep = (j.metadata or {}).get(SWEEP_KEY)
        if sweep:
            typer.echo(f"  {j.submission_id}  {j.status.value}  sweep {sweep}")


_URI = options.tracking_uri("The sweep's MLflow store")


@app.command("status")
def status(
    name: str = typer.Argument(..., metavar="NAME", help="Sweep name."),
    tracking_uri: str = _URI,
) -> None:
    """Each trial's swept values, state, step, last loss and eval loss, speed, ETA and MLflow
    run, from the sweep's MLflow record (right while it runs and after the cluster is gone)."""
    from sweeps.status import sweep_status
    from ttt.tracking import resolve_uri

    typer.echo(sweep_status(name, resolve_uri(tracking_uri)))


@app.command("watch")
def watch(
    name: str = typer.Argument(..., metavar="NAME", help="Sweep name."),
    tracking_uri: str = _URI,
    every: float = typer.Option(5.0, "--every", min=0.5, help="Seconds between refreshes."),
) -> None:
    """A live table of the sweep's trials, redrawn until the sweep ends (from any terminal;
    Ctrl-C stops watching, not the sweep)."""
    from sweeps.status import watch as watch_sweep
    from ttt.tracking import resolve_uri

    try:
        code = watch_sweep(name, resolve_uri(tracking_uri), every)
    except KeyboardInterrupt:
        from ttt.errors import Interrupted

        raise Interrupted("stopped watching; the sweep goes on") from None
    raise typer.Exit(code)


@app.command("ls")
def ls(tracking_uri: str = _URI) -> None:
    """The sweeps in the MLflow store, with their trials' states."""
    from sweeps.status import list_sweeps
    from ttt.tracking import resolve_uri

    typer.echo(list_sweeps(resolve_uri(tracking_uri)))
