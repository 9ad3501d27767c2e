"""`ttt report`: which of the paper's claims a store's runs support (`analysis.report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ttt.cli import options
from ttt.errors import UserError

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.


def report(
    experiment: list[str] = typer.Option(
        None,
        "--experiment",
        "-e",
        help="Experiment (sweep) to read; repeat for several; "
        "default every experiment in the store.",
    ),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for the report's files."),
    tracking_uri: str = options.tracking_uri(),
    log: bool = typer.Option(
        True, "--log/--no-log", help="Also log the report to each experiment's parent run."
    ),
) -> None:
    """One page per study: each of the paper's claims (analysis/claims.py) with its
    verdict on these runs (supported, contradicted, inconclusive, not evidence, no runs),
    the numbers with their intervals, the paper's, and links to the runs."""
    # deferred: the analysis stack (Polars, Matplotlib, MLflow) loads only for this command
    from analysis.loaders import require_experiments, runs
    from analysis.report import build, log_to_parents
    from ttt.tracking import resolve_uri, sqlite_path

    if out.exists() and not out.is_dir():
        raise UserError(f"--out={str(out)!r}: is a file; give a folder for the report")
    uri = resolve_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise UserError(f"no MLflow store at {uri} (--tracking-uri?)")
    if experiment:
        require_experiments(uri, experiment)
    if runs(uri, experiment or None).is_empty():
        raise UserError(
            f"{uri}: holds no trial runs{' in ' + ', '.join(experiment) if experiment else ''}; "
            "run a sweep first (make quickstart, or ttt sweep run SPEC)"
        )
    result = build(uri, experiment or None, out)
    counts = {}
    for v in result["verdicts"]:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    for v in result["verdicts"]:
        typer.echo(f"{v.verdict:>13}  {v.claim}: {v.reason}")
    typer.echo(", ".join(f"{n} {k}" for k, n in counts.items()) + f" ({result['seconds']:.1f} s)")
    if log:
        parents = log_to_parents(uri, experiment or None, result["files"])
        if parents:
            typer.echo(f"logged to {len(parents)} sweep parent run(s) in {uri}")
    typer.echo(
        f"report: {result['files'][0]} (also {result['files'][1].name}, {result['files'][2].name})"
    )
