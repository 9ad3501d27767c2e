"""How every entry point ends (the CLI, a sweep's Ray job driver): its exit code, or for
what a user can act on one line on stderr and the matching code, never a traceback.
Below both `ttt.cli` and `sweeps`, so neither reaches up into the other."""

from __future__ import annotations

import os
import sys

import typer

# typer >= 0.26 bundles its own click: usage errors are `typer._click` exceptions, which
# the standalone `click` package's classes do not catch. Both derive from these public
# typer classes (pyproject pins the typer range this is tested with).
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from ttt.errors import Interrupted, UserError, out_of_memory


def usage_line(e: UsageError) -> str:
    """One line: what was wrong, and where the command's help is."""
    message = " ".join(e.format_message().split())
    where = e.ctx.command_path if e.ctx is not None else "ttt"
    return f"error: {message} (see '{where} --help')"


def run_entry(call, command: str = "") -> None:
    """Run an entry point (the CLI, a Ray job's driver) and exit: its returned code, or for
    what a user can act on one line on stderr and the matching code, never a traceback."""
    try:
        code = call()
    except NoArgsIsHelpError as e:  # a bare group: its help, then the usage exit code
        typer.echo(e.format_message(), err=True)
        sys.exit(2)
    except UsageError as e:
        print(usage_line(e), file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Interrupted as e:
        print(e, file=sys.stderr)
        _exit_now(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # other click errors (a file that cannot be opened)
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1) or 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit_now(130)
    except Exception as e:
        line = out_of_memory(e, command)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_now(code: int) -> None:
    """Exit at once after Ctrl-C. A KeyboardInterrupt can land while XLA still runs work
    it dispatched (a decode step); tearing the interpreter down around it then crashes in
    XLA's threads (SIGSEGV instead of 130). Whatever had to be recorded was recorded by
    the command's own handlers on the way here (run.json, the MLflow run's status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
