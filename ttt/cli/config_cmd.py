"""`ttt config show`: the resolved config and its parameter counts."""

from __future__ import annotations

import typer

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
