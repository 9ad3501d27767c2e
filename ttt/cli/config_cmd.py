"""`ttt config show`: the resolved config and its parameter counts."""

from __future__ import annotations

import typer

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)


def split_source(args: list[str]) -> tuple[str | None, list[str]]:
    """`[PRESET|FILE] [key=value ...]`: the source is optional and never contains '='."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


@app.command("show")
def show(
    args: list[str] = typer.Argument(
        None, metavar="[PRESET|FILE] [dotted.key=value ...]", help="Default preset pico."
    ),
) -> None:
    """Print the resolved config (YAML) and its parameter counts."""
    from ttt.config import load_config
    from ttt.model.params import param_counts

    source, overrides = split_source(args or [])
    cfg = load_config(source, overrides)
    typer.echo(cfg.to_yaml().rstrip())
    counts = param_counts(cfg.model)
    typer.echo("params:")
    for name, n in counts.items():
        typer.echo(f"  {name}: {n:,}  ({n / 1e6:.2f}M)")
    typer.echo(f"mixer: {describe_mixer(cfg.model)}")


def describe_mixer(m) -> str:
    """What the sequence mixer is, with its shapes, and how its size is matched."""
    from ttt.shapes import RECURRENT, gdn_dims, kvb_dims, mamba_dims, mixer_params, model_params

    per_block = f"{mixer_params(m):,} params per block's mixer; MLP {m.mlp}"
    what = {
        "full": "causal attention over every earlier token",
        "swa": f"sliding-window attention, window {m.window}",
        "hybrid": f"SWA (window {m.window}) with full attention in every {m.full_every}th "
        f"layer ({m.layers // m.full_every} of {m.layers})",
        "ttt_e2e": f"SWA (window {m.window}); the last {m.ttt_layers} blocks learn at test "
        "time (prime MLPs"
        + (f" of {m.fast_heads} heads each)" if m.fast_heads else ")")
        + "; the inner loss is next-token prediction at the network's end",
    }
    if m.mixer == "ttt_kvb":
        h, hd, f = kvb_dims(m)
        rule = "g(k), the inner loss's own prediction" if m.kvb_output == "key" else "g(q)"
        loss = "||g(k) - v||^2" if m.kvb_loss == "mse" else "-<g(k), v>"
        what[m.mixer] = (
            f"TTT-KVB: SWA (window {m.window}) and, in every block, {h} fast-weight heads "
            f"(SwiGLU {hd}->{f}->{hd}) trained every {m.kvb_chunk} tokens on {loss}; "
            f"output {rule}"
        )
    if m.mixer == "gated_deltanet":
        h, dk, dv = gdn_dims(m)
        what[m.mixer] = f"Gated DeltaNet, {h} heads, keys {dk} and values {dv} per head"
    if m.mixer == "mamba2":
        inner, h, n = mamba_dims(m)
        what[m.mixer] = f"Mamba 2, inner width {inner}, {h} heads of {inner // h}, state {n}"
    matched = m.mixer in (*RECURRENT, "ttt_kvb") or m.fast_heads
    matched = " (MLP matched to full attention's parameter count)" if matched else ""
    return f"{what[m.mixer]}; {per_block}{matched}; formula total {model_params(m):,}"
