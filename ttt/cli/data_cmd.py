"""`ttt data prepare`: text corpora tokenised into the reference Zarr layout."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Prepare text corpora in the reference Zarr layout.", no_args_is_help=True)


@app.command("prepare")
def prepare(
    out: Path = typer.Option(..., "--out", help="Dataset directory to write (DIR/train, DIR/val)."),
    source: str = typer.Option(
        "stdlib",
        help="stdlib (Python source), pydocs (the Python documentation's prose, from "
        "Debian's python3-doc), a directory, or a glob of files.",
    ),
    force: bool = typer.Option(False, help="Rewrite even when the content is unchanged."),
    tokenizer: str = typer.Option(
        "bytes",
        "--tokenizer",
        help="bytes, or a local tokenizer.json (or a directory holding one); never downloaded.",
    ),
    bos_token: str = typer.Option(
        None, "--bos-token", help="The tokenizer's BOS token (default: found by common names)."
    ),
) -> None:
    """Tokenise files (one document each, BOS first) and split train/val."""
    from ttt.data.prepare import prepare as do_prepare
    from ttt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer, bos_token)
    meta = do_prepare(source, out, force=force, tokenizer=tok)
    typer.echo(json.dumps(meta, indent=2))
