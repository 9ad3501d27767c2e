"""`ttt data prepare`: text corpora tokenised into the reference Zarr layout."""

from __future__ import annotations

import json
from pathlib import Path

import typer

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

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


@app.command("stats")
def stats(
    source: str = typer.Argument(
        ..., metavar="SOURCE", help="stdlib, pydocs, recall, or a prepared dataset directory."
    ),
    orders: int = typer.Option(5, "--orders", min=1, max=8, help="Highest n-gram order."),
    cache_dir: str = typer.Option("", "--cache-dir", help="Where built-in corpora live."),
) -> None:
    """The dataset's split sizes and its floors: held-out nats per token of n-gram count
    models (interpolated Kneser-Ney) fitted on the training split, computed once per
    content fingerprint and kept beside the dataset."""
    from ttt.data.floors import NAMES, floors_of
    from ttt.data.loader import open_split
    from ttt.data.recall import SOURCE as RECALL
    from ttt.data.recall import RecallTask

    if source == RECALL:
        task = RecallTask()
        typer.echo(
            f"recall (drawn, not stored): {task.pairs} pairs of {task.keys} keys and "
            f"{task.values} values among {task.filler} filler ids; chance accuracy "
            f"{task.chance:.4f}, answer NLL at chance {__import__('math').log(task.values):.4f} "
            "nats (the recall.* config keys change them)"
        )
        return
    floors = floors_of(source, cache_dir, orders)
    train = open_split(source, "train", cache_dir)
    typer.echo(
        f"{source}: {train.path.parent} (fingerprint {train.fingerprint}, vocabulary "
        f"{floors.vocab_size}, BOS {train.bos_id})"
    )
    typer.echo(
        f"splits: train {len(train):,} tokens, val {len(open_split(source, 'val', cache_dir)):,}"
        f" tokens; fitted on {floors.train_tokens:,}, scored on {floors.val_tokens:,} "
        "held-out targets"
    )
    typer.echo(f"floors (held-out nats per token, {floors.smoothing}):")
    for order, value in sorted(floors.orders.items()):
        typer.echo(f"  {NAMES.get(order, f'{order}-gram'):>8}  {value:.4f}")
    typer.echo(f"computed in {floors.seconds:.1f} s, kept for this fingerprint")
