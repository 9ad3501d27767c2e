"""`ttt bench train|prefill`: mixers side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ttt.cli import options
from ttt.cli.config_cmd import split_source
from ttt.errors import UserError

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

app = typer.Typer(help="Measure step time, tokens/s, MFU and compile time.", no_args_is_help=True)


def _run(
    mode: str,
    args: list[str],
    mixers: str,
    steps: int,
    warmup: int,
    out: Path | None,
    tracking_uri: str | None = None,
):
    from ttt.bench import bench_one, format_table
    from ttt.config import ConfigError, load_config

    source, overrides = split_source(args or [])
    if tracking_uri:  # before minutes of measuring, not after
        from ttt.tracking import check_uri

        check_uri(tracking_uri)
    names = _mixer_names(mixers)
    if steps < 1:
        raise ConfigError(f"--steps={steps}: must be >= 1")
    configs = [load_config(source, [*overrides, f"model.mixer={m}"]) for m in names]
    rows = []
    for cfg in configs:  # validate all before compiling any
        rows.append(bench_one(cfg, mode, steps=steps, warmup=warmup))
        typer.echo(f"  {cfg.model.mixer}: {rows[-1].step_s:.4f} s/step", err=True)
    _emit(rows, format_table(rows), out, tracking_uri)
    return rows


def _mixer_names(mixers: str) -> list[str]:
    from ttt.config import MIXERS, ConfigError

    names = [m.strip() for m in mixers.split(",") if m.strip()]
    for name in names:
        if name not in MIXERS:
            raise ConfigError(f"--mixers: {name!r} is not a mixer; allowed are {', '.join(MIXERS)}")
    return names


def _emit(rows, table: str, out: Path | None, tracking_uri: str | None) -> None:
    """The table on stdout; the rows as JSON (`--json`) and in MLflow (`--tracking-uri`)."""
    typer.echo(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
        typer.echo(f"wrote {out}")
    if tracking_uri:
        from ttt.tracking import log_bench_rows

        log_bench_rows(tracking_uri, [r.as_dict() for r in rows])
        typer.echo(f"logged {len(rows)} rows to {tracking_uri} (experiment 'bench')")


_ARGS = typer.Argument(
    None, metavar="[PRESET|FILE] [dotted.key=value ...]", help="Default preset pico."
)
_MIXERS = typer.Option("full,swa,ttt_e2e", help="Comma-separated mixers to compare.")
_STEPS = typer.Option(5, min=1, help="Timed steps (median reported).")
_WARMUP = typer.Option(1, min=0, help="Untimed steps after compile.")
_OUT = typer.Option(None, "--json", help="Write the rows as JSON here.")
_URI = options.tracking_uri("Also log each row to MLflow, experiment 'bench'", "off without it")


def _timing_command(mode: str, doc: str):
    def command(
        args: list[str] = _ARGS,
        mixers: str = _MIXERS,
        steps: int = _STEPS,
        warmup: int = _WARMUP,
        out: Path = _OUT,
        tracking_uri: str = _URI,
    ) -> None:
        _run(mode, args, mixers, steps, warmup, out, tracking_uri)

    command.__doc__ = doc
    return command


app.command("train")(
    _timing_command(
        "train", "Time the full training step (outer gradient, through the inner loop with meta)."
    )
)
app.command("prefill")(
    _timing_command(
        "prefill", "Time the loss over a sequence with the inner loop and no outer gradient."
    )
)


@app.command("decode")
def decode(
    args: list[str] = _ARGS,
    mixers: str = _MIXERS,
    contexts: str = typer.Option(
        "256,1024,4096", "--contexts", help="Comma-separated prompt lengths (tokens)."
    ),
    tokens: int = typer.Option(64, "--tokens", help="Timed tokens per row (mean reported)."),
    out: Path = _OUT,
    tracking_uri: str = _URI,
) -> None:
    """Latency per generated token against context length, each mixer, in one run."""
    from ttt.bench import bench_decode, format_table
    from ttt.config import load_config

    source, overrides = split_source(args or [])
    try:
        lengths = [int(c) for c in contexts.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--contexts={contexts!r}: expected comma-separated integers") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"--contexts={contexts!r}: expected positive lengths")
    if tokens < 1:
        raise UserError(f"--tokens={tokens}: must be >= 1")
    names = _mixer_names(mixers)
    if tracking_uri:
        from ttt.tracking import check_uri

        check_uri(tracking_uri)
    configs = [
        load_config(source, [*overrides, f"model.mixer={m}", f"data.seq_len={n}"])
        for m in names
        for n in lengths
    ]
    rows = []
    for cfg in configs:  # all validated before the first is measured
        rows.append(bench_decode(cfg, tokens))
        typer.echo(
            f"  {cfg.model.mixer} T={cfg.data.seq_len}: {1000 * rows[-1].step_s:.2f} ms/token",
            err=True,
        )
    _emit(rows, format_table(rows), out, tracking_uri)


@app.command("cache")
def cache(args: list[str] = _ARGS, mixers: str = _MIXERS) -> None:
    """Cold compile against a learning-rate-only change with the persistent cache warm."""
    import tempfile

    from ttt.bench import bench_compile_cache
    from ttt.config import load_config

    source, overrides = split_source(args or [])
    typer.echo(f"{'preset':6} {'mixer':8} {'cold s':>8} {'warm s':>8} {'warm/cold':>9}")
    configs = [
        load_config(source, [*overrides, f"model.mixer={m.strip()}"])
        for m in mixers.split(",")
        if m.strip()
    ]
    # One fresh cache for the whole command: JAX binds its cache folder once per process.
    with tempfile.TemporaryDirectory() as d:
        for cfg in configs:
            r = bench_compile_cache(cfg, d)
            typer.echo(
                f"{r['preset']:6} {r['mixer']:8} {r['cold_s']:8.2f} {r['warm_lr_only_s']:8.2f} "
                f"{100 * r['ratio']:8.1f}%"
            )


@app.command("memory")
def memory(
    args: list[str] = _ARGS,
    mixers: str = typer.Option("full,ttt_e2e", help="Comma-separated mixers."),
    remat: str = typer.Option("none,block", help="Comma-separated model.remat values."),
) -> None:
    """The dry run's memory estimate of the train step against XLA's own memory analysis
    of the compiled step (compiled from shapes, never run)."""
    from ttt.bench import bench_memory
    from ttt.config import load_config

    source, overrides = split_source(args or [])
    configs = [
        load_config(source, [*overrides, f"model.mixer={m}", f"model.remat={r.strip()}"])
        for m in _mixer_names(mixers)
        for r in remat.split(",")
        if r.strip()
    ]
    typer.echo(f"{'preset':6} {'mixer':14} {'remat':5} {'T':>6} {'B':>3} {'estimate GB':>11} "
               f"{'XLA GB':>9} {'est/XLA':>8}")  # fmt: skip
    for cfg in configs:  # all validated before the first compiles
        r = bench_memory(cfg)
        xla = "-" if r["xla_gb"] is None else f"{r['xla_gb']:9.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:8.3f}"
        typer.echo(
            f"{r['preset']:6} {r['mixer']:14} {r['remat']:5} {r['seq_len']:6d} {r['batch']:3d} "
            f"{r['estimate_gb']:11.3f} {xla:>9} {ratio:>8}"
        )


@app.command("analysis")
def analysis_bench(
    runs: int = typer.Option(500, "--runs", min=1),
    steps: int = typer.Option(1000, "--steps", min=1),
    metrics: int = typer.Option(5, "--metrics", min=1),
) -> None:
    """Time the analysis loaders on a synthetic MLflow store (runs x steps x metrics)."""
    import tempfile
    from pathlib import Path

    from analysis.synthetic import bench_analysis

    with tempfile.TemporaryDirectory() as d:
        r = bench_analysis(Path(d), runs, steps, metrics)
    typer.echo(json.dumps(r, indent=2))


@app.command("import")
def import_bench(
    args: list[str] = typer.Argument(
        None, metavar="[PRESET] [dotted.key=value ...]", help="Shapes to import (default pico)."
    ),
) -> None:
    """Peak host memory of `ttt import reference` on a random checkpoint of these shapes,
    against the weights' size and an interpreter that only imports the same code."""
    import tempfile

    from ttt.bench import bench_import
    from ttt.config import load_config

    source, overrides = split_source(args or [])
    cfg = load_config(source, [*overrides, "model.mixer=ttt_e2e"])
    with tempfile.TemporaryDirectory() as d:
        r = bench_import(cfg, Path(d))
    typer.echo(json.dumps(r, indent=2))
