"""`ttt data prepare`: byte-level corpora in the reference Zarr layout."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="Prepare byte-level corpora in the reference Zarr layout.", no_args_is_help=True
)


@app.command("prepare")
def prepare(
    out: Path = typer.Option(..., "--out", help="Dataset directory to write (DIR/train, DIR/val)."),
    source: str = typer.Option("stdlib", help="stdlib, a directory, or a glob of files."),
    force: bool = typer.Option(False, help="Rewrite even when the content is unchanged."),
) -> None:
    """Tokenise files as bytes (one document each, BOS first) and split train/val."""
    from ttt.data.prepare import prepare as do_prepare

    meta = do_prepare(source, out, force=force)
    typer.echo(json.dumps(meta, indent=2))
