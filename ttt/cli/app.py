"""`ttt`: one typer app; each command group lives in its own module."""

from __future__ import annotations

import sys

import click
import typer

from ttt.errors import UserError

app = typer.Typer(
    name="ttt",
    help="Run, track and plot End-to-End Test-Time Training (TTT-E2E) experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    from ttt.cli import bench_cmd, config_cmd, plots_cmd, sweep_cmd, tracking_cmd, train_cmd

    app.add_typer(config_cmd.app, name="config")
    app.add_typer(train_cmd.data_app, name="data")
    app.command("train")(train_cmd.train)
    app.command("eval")(train_cmd.evaluate)
    app.add_typer(sweep_cmd.app, name="sweep")
    app.command("ui")(sweep_cmd.ui)
    app.command("plots")(plots_cmd.plots)
    app.add_typer(tracking_cmd.app, name="tracking")
    app.add_typer(bench_cmd.app, name="bench")


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="ttt", standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
