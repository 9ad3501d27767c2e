"""`ttt tracking serve` (an MLflow server for sweeps that span several nodes), `ttt tracking
flush` (records kept while a server was away) and `ttt ui`."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import typer

from ttt import process
from ttt.cli import options

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

app = typer.Typer(help="MLflow tracking server for multi-node sweeps.", no_args_is_help=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def light_env() -> None:
    """MLflow 3 starts a pool of job workers (huey consumers) for GenAI scorer jobs beside
    every server: seven more processes that training runs never use. Off unless asked."""
    process.set_env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false", keep=True)


def server_args(
    host: str, port: int, backend_store_uri: str, artifacts_destination: str, workers: int = 1
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        str(workers),
    ]


@app.command("serve")
def serve(
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind (loopback by default)."
    ),
    port: int = typer.Option(5000, "--port"),
    backend_store_uri: str = typer.Option(
        None, "--backend-store-uri", help="Default sqlite:///./mlflow.db."
    ),
    artifacts_destination: str = typer.Option(
        None, "--artifacts-destination", help="Default ./mlartifacts (or s3://..., gs://...)."
    ),
    workers: int = typer.Option(
        1, "--workers", help="Server processes (one sweep driver writes; one is enough)."
    ),
) -> None:
    """Serve tracking and artifacts; point sweeps at it with --tracking-uri http://HOST:PORT."""
    from ttt.tracking import default_tracking_uri

    backend = backend_store_uri or default_tracking_uri()
    artifacts = artifacts_destination or str(Path("mlartifacts").absolute())
    if not is_loopback(host):
        typer.echo(
            f"warning: binding {host}: an MLflow server has no authentication, anyone who "
            "can reach this port can read and change every run. Keep it on a private "
            "network, or behind an authenticating proxy.",
            err=True,
        )
    typer.echo(
        f"MLflow tracking server on http://{host}:{port} (store {backend}, artifacts {artifacts})"
    )
    typer.echo(f"  sweeps: ttt sweep run SPEC --tracking-uri http://{host}:{port}")
    args = server_args(host, port, backend, artifacts, workers)
    light_env()
    os.execv(args[0], args)


def ui(
    tracking_uri: str = options.tracking_uri(),
    port: int = typer.Option(5000, "--port"),
    workers: int = typer.Option(1, "--workers", help="Server processes (one is enough locally)."),
) -> None:
    """Start the MLflow UI on 127.0.0.1."""
    from ttt.tracking import resolve_uri, run_link

    uri = resolve_uri(tracking_uri)
    args = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    typer.echo(f"MLflow UI for {uri} at {run_link(f'http://127.0.0.1:{port}')}")
    light_env()
    os.execv(sys.executable, args)


@app.command("flush")
def flush(
    folder: Path = typer.Argument(
        ...,
        metavar="DIR",
        help="A run directory, or a tracking queue's folder (a sweep's, as its line names).",
    ),
    tracking_uri: str = typer.Option(
        None, "--tracking-uri", help="Default: the server the records were meant for."
    ),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to keep trying."),
) -> None:
    """Send the MLflow records a run or sweep kept while its server was away."""
    from ttt.tracking.records import flush_queue

    sent, left, refused, uri = flush_queue(folder, tracking_uri, timeout)
    if not (sent or left or refused):
        typer.echo(f"{folder}: nothing pending for {uri}")
        return
    typer.echo(
        f"{folder}: {sent} records sent to {uri}"
        + (f", {refused} refused for good (kept in rejected.jsonl)" if refused else "")
        + (f"; {left} still pending" if left else "")
    )
    if left:
        raise typer.Exit(1)
