"""`ttt import reference`: checkpoints of the reference implementation as runs of ours."""

from __future__ import annotations

from pathlib import Path

import typer

from ttt.cli.config_cmd import split_source

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

# What the weights cannot tell: how the model read its context when it was trained.
ASSUMED = ("model.window", "ttt.chunk", "ttt.inner_lr")

app = typer.Typer(help="Import checkpoints written by other code.", no_args_is_help=True)


@app.command("reference")
def reference(
    ckpt: str = typer.Argument(
        ...,
        metavar="CKPT",
        help="The reference code's Orbax CheckpointManager directory (or its run directory).",
    ),
    args: list[str] = typer.Argument(
        None,
        metavar="[PRESET] [dotted.key=value ...]",
        help="Window, chunk, inner LR etc. (not in the checkpoint); shapes come from the weights.",
    ),
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    step: int = typer.Option(None, "--step", help="Checkpoint step (default the latest)."),
    bos_id: int = typer.Option(
        128000, "--bos-id", help="The tokenizer's BOS id (default Llama 3's, 128000)."
    ),
) -> None:
    """Write a run directory (config.yaml, run.json, checkpoints/) that `ttt eval`,
    `train.init_from=RUN` and sweep stages accept."""
    from ttt.config import parse_overrides
    from ttt.train.importer import import_reference

    preset, overrides = split_source(args or [])
    cfg, step = import_reference(ckpt, out, preset, overrides, step=step, bos_id=bos_id)
    given = parse_overrides(overrides)
    assumed = [k for k in ASSUMED if k in cfg.flat() and k not in given]
    if cfg.model.mixer != "ttt_e2e":
        assumed = [k for k in assumed if k == "model.window"]
    if assumed:
        flat = cfg.flat()
        typer.echo(
            "warning: the checkpoint does not hold "
            + ", ".join(assumed)
            + f"; assumed {' '.join(f'{k}={flat[k]}' for k in assumed)} from preset "
            f"{cfg.preset}. They must match how it was trained (a wrong chunk gives another "
            "loss): re-import with the right values as overrides if they differ",
            err=True,
        )
    m = cfg.model
    typer.echo(
        f"{out}: imported step {step} ({m.mixer}, {m.layers} layers, width {m.width}, "
        f"{m.heads} heads, MLP {m.mlp}, vocab {m.vocab_size}"
        + (f", {m.ttt_layers} TTT layers" if m.mixer == "ttt_e2e" else "")
        + f"; window {m.window}, chunk {cfg.ttt.chunk}, inner_lr {cfg.ttt.inner_lr}; "
        f"BOS {bos_id})"
    )
