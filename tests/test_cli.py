"""Usage errors, as a user meets them: one line, exit code 2, no traceback.

Every command of the `ttt` tree is walked, so a new command is covered without a new test:
an unknown option, an option given without its value, a required argument left out, and
a number option given a word.
"""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer.main

from ttt.cli import main
from ttt.cli.app import app


def _leaves(cmd, path=()):
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


LEAVES = dict(_leaves(typer.main.get_command(app)))


def _run(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


def _assert_usage_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3, err
    assert needle in err, err


def _cases():
    for path, cmd in LEAVES.items():
        name = " ".join(path)
        yield pytest.param([*path, "--no-such-option"], "--no-such-option", id=f"{name}:unknown")
        hints = typing.get_type_hints(cmd.callback)
        for p in cmd.params:
            if p.param_type_name == "argument" and p.required:
                yield pytest.param(list(path), "Missing argument", id=f"{name}:missing-arg")
            if p.param_type_name != "option" or p.is_flag or "--help" in p.opts:
                continue
            opt = max(p.opts, key=len)
            yield pytest.param([*path, opt], opt, id=f"{name}:{opt}-no-value")
            if hints.get(p.name) in (int, float):
                args = ["x"] if any(q.required for q in cmd.params) else []
                yield pytest.param([*path, *args, opt, "abc"], opt, id=f"{name}:{opt}-bad-type")


@pytest.mark.parametrize("argv,needle", list(_cases()))
def test_every_command_rejects_bad_usage_in_one_line(argv, needle, capsys):
    _assert_usage_error(*_run(argv, capsys), needle)


def test_the_walk_covers_every_command():
    names = {" ".join(p) for p in LEAVES}
    assert {"train", "eval", "sweep run", "tracking serve", "bench train", "plots"} <= names


def test_a_typo_suggests_the_command(capsys):
    code, err = _run(["trian", "nano"], capsys)
    _assert_usage_error(code, err, "'train'")


def test_a_bare_group_prints_its_help_and_exits_2(capsys):
    for argv in ([], ["sweep"], ["bench"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Commands:" in err and "Traceback" not in err


def test_help_shows_the_override_syntax(capsys):
    for argv in (["train", "--help"], ["config", "show", "--help"], ["bench", "train", "-h"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "[dotted.key=value ...]" in capsys.readouterr().out


TTT = str(Path(sys.executable).with_name("ttt"))


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "Commands:"),
        (["eval"], "RUN"),
        (["train", "nano", "--steps", "10"], "--steps"),
        (["trian", "nano"], "'train'"),
        (["eval", "RUN", "--seq-len", "abc"], "--seq-len"),
        (["tracking", "serve", "--port", "notaport"], "--port"),
    ],
)
def test_the_installed_command(argv, needle):
    """The console script itself, as typed in a shell."""
    p = subprocess.run([TTT, *argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and needle in p.stderr
    if argv:
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_commands_exit_code_is_the_processs(monkeypatch):
    """Without standalone mode click returns `typer.Exit(code)`'s code instead of raising
    it; `ttt` exits with it (a failed sweep job must not look like success to make)."""
    cli_app = sys.modules["ttt.cli.app"]  # `ttt.cli.app` the attribute is the Typer app
    tiny = typer.Typer()

    @tiny.command()
    def fail():
        raise typer.Exit(3)

    @tiny.command()
    def succeed():
        pass

    monkeypatch.setattr(cli_app, "app", tiny)
    for argv, code in ((["fail"], 3), (["succeed"], 0)):
        with pytest.raises(SystemExit) as e:
            cli_app.main(argv)
        assert e.value.code == code, argv
