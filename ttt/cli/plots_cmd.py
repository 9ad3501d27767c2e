"""`ttt plots`: every paper figure that the tracked runs can draw."""

from __future__ import annotations

from pathlib import Path

import typer

from ttt.cli import options

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.


def plots(
    experiment: list[str] = typer.Option(
        None, "--experiment", "-e", help="Sweep name(s); default all."
    ),
    tracking_uri: str = options.tracking_uri(),
    out: Path = typer.Option(Path("figures"), "--out", help="Folder for the figures."),
    fmt: str = typer.Option("png,pdf", "--format", help="Comma-separated image formats."),
) -> None:
    """Build every figure that has data; name the sweep that would produce each missing one."""
    from analysis.figures import build_all
    from analysis.loaders import require_experiments
    from ttt.errors import UserError
    from ttt.tracking import announce, check_uri, resolve_uri, sqlite_path

    formats = [f.strip() for f in fmt.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        raise UserError(f"--format={fmt!r}: allowed are png, pdf, svg (comma-separated)")
    uri = resolve_uri(tracking_uri)
    if (db := sqlite_path(uri)) is not None and not db.exists():
        raise UserError(f"--tracking-uri={uri!r}: no such database (run a sweep first)")
    check_uri(uri)
    announce(uri)
    if experiment:
        require_experiments(uri, experiment)
    written, missing = build_all(uri, out, experiment or None, formats)
    for name, paths in written.items():
        typer.echo(f"{name}: " + ", ".join(str(p) for p in paths))
    for name, hint in missing.items():
        typer.echo(f"{name}: no data yet; run {hint}")
    if not written:
        typer.echo("no figure had data")
