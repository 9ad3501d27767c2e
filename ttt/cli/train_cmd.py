"""`ttt train`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ttt import process
from ttt.cli import options
from ttt.cli.config_cmd import split_source
from ttt.errors import Interrupted
from ttt.tracking import optional_uri

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.


def default_out(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset}-{cfg.model.mixer}-{stamp}"


def train(
    args: list[str] = typer.Argument(
        ...,
        metavar="CONFIG|PRESET [dotted.key=value ...]",
        help="A preset or a YAML config, then overrides.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Run directory (default runs/<preset>-<mixer>-<time>)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    coordinator: str = typer.Option(
        None, "--coordinator", help="HOST:PORT of process 0, for a multi-process run."
    ),
    num_processes: int = typer.Option(1, "--num-processes"),
    process_id: int = typer.Option(0, "--process-id"),
    tracking_uri: str = options.tracking_uri(
        "Track the run in MLflow here", "or set MLFLOW_TRACKING_URI; untracked otherwise"
    ),
    experiment: str = options.experiment("runs"),
    system_metrics: bool = typer.Option(
        True, "--system-metrics/--no-system-metrics", help="Log CPU/memory/GPU use to MLflow."
    ),
) -> None:
    """Train a model; running again with the same --out resumes from its last checkpoint."""
    from ttt.config import load_config
    from ttt.train import run
    from ttt.train.checkpoint import read_run_info

    process.quiet_checkpoint_errors()
    source, overrides = split_source(args)
    cfg = load_config(source, overrides)
    uri = optional_uri(tracking_uri)
    if coordinator:
        from ttt.train.distributed import initialize

        initialize(coordinator, num_processes, process_id)
    out = out or default_out(cfg)
    reporter = None
    if uri and process_id == 0:
        from analysis.run_figures import eval_figure_files
        from ttt.tracking import MlflowReporter

        process.tracking_env()
        reporter = MlflowReporter(
            uri, experiment, cfg, out, system_metrics=system_metrics, render=eval_figure_files
        )
    try:
        result = run(cfg, out, reporter=reporter, progress=not quiet)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if reporter is not None:  # nothing stays RUNNING: a re-run continues this MLflow run
            reporter.close("interrupted" if interrupted else "error", str(e).split("\n")[0])
        if interrupted:
            kept = read_run_info(out).get("step", 0)
            raise Interrupted(
                f"interrupted; the last checkpoint is step {kept}: the same command resumes"
                if kept
                else "interrupted before any checkpoint: the same command starts again"
            ) from None
        raise
    if reporter is not None:
        reporter.close(
            result.status if result.status != "stopped" else "interrupted",
            result.message,
            result.eval_loss,
        )
    if result.status == "interrupted":
        raise Interrupted(
            f"interrupted at step {result.step} (checkpointed); the same command resumes",
            result.signal,
        )
    if result.status == "diverged":
        typer.echo(f"{out}: {result.message}")
        return
    typer.echo(
        f"{out}: {result.status} at step {result.step}, loss {result.loss:.4f}"
        + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
    )
