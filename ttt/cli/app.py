"""`ttt`: one typer app; each command group lives in its own module."""

from __future__ import annotations

import sys

import typer

from ttt.entry import run_entry

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.

app = typer.Typer(
    name="ttt",
    help="Run, track and plot End-to-End Test-Time Training (TTT-E2E) experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help text: rich markup would swallow "[dotted.key=value ...]".
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from ttt.cli import (
        bench_cmd,
        config_cmd,
        data_cmd,
        eval_cmd,
        generate_cmd,
        import_cmd,
        plots_cmd,
        report_cmd,
        sweep_cmd,
        tracking_cmd,
        train_cmd,
    )

    app.add_typer(config_cmd.app, name="config")
    app.add_typer(data_cmd.app, name="data")
    app.command("train")(train_cmd.train)
    app.command("eval")(eval_cmd.evaluate)
    app.add_typer(import_cmd.app, name="import")
    app.command("generate")(generate_cmd.generate)
    app.add_typer(sweep_cmd.app, name="sweep")
    app.command("ui")(tracking_cmd.ui)
    app.command("plots")(plots_cmd.plots)
    app.command("report")(report_cmd.report)
    app.add_typer(tracking_cmd.app, name="tracking")
    app.add_typer(bench_cmd.app, name="bench")


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and user errors become one line on stderr and exit code 2."""
    args = argv if argv is not None else sys.argv[1:]

    def call():
        # Without standalone mode click *returns* the code of `typer.Exit(code)` (and 130
        # for Ctrl-C, which it caught) instead of raising it: it is the process's exit code.
        code = app(args=argv, prog_name="ttt", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        return code

    run_entry(call, next(iter(args), ""))
