"""Ctrl-C as a terminal sends it: SIGINT to the installed `ttt`'s process group, in a
process whose SIGINT is at its default (a non-interactive shell's background job starts
with it ignored, so the harness resets it). Each command prints one line and exits 130;
`ttt train` checkpoints the step it stopped at and says so in run.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import PICO_TRAIN

TTT = str(Path(sys.executable).with_name("ttt"))
# SIGINT back at its default, then `ttt` itself (exec keeps the pid and the group). Not a
# preexec_fn: forking this multithreaded (JAX) process is unsafe.
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _start(argv, cwd=None, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT, TTT, *argv],
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_when(p: subprocess.Popen, ready, signum=signal.SIGINT, timeout=240):
    """Send `signum` to p's group once `ready()` holds; (exit code, stderr, seconds the
    process took to exit after the signal)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.2)
    os.killpg(p.pid, signum)
    sent = time.monotonic()
    _, err = p.communicate(timeout=60)
    return p.returncode, err, time.monotonic() - sent


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    return [r["step"] for r in lines if "loss" in r]


def _train(corpus, out):
    # swa: what a signal does is no mixer's business, and swa compiles in seconds
    return _start(
        [
            "train",
            "pico",
            *PICO_TRAIN,
            "model.mixer=swa",
            f"data.source={corpus}",
            "train.steps=5000",
            "train.log_every=1",
            "--out",
            str(out),
            "-q",
        ]  # fmt: skip
    )


def test_ctrl_c_stops_train_with_a_checkpoint_and_the_same_command_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    code, err, took = _interrupt_when(_train(corpus, run), lambda: len(_steps(run)) >= 3)
    assert code == 130, err
    assert "Traceback" not in err and took < 30, err
    info = json.loads((run / "run.json").read_text())
    stopped = info["step"]
    assert info["status"] == "interrupted" and stopped >= 3, info
    assert f"interrupted at step {stopped} (checkpointed); the same command resumes" in err
    assert (run / "checkpoints" / str(stopped)).is_dir()
    assert _steps(run) == list(range(1, stopped + 1))

    # The same command goes on from there: no step is trained twice or skipped.
    code, err, _ = _interrupt_when(
        _train(corpus, run), lambda: len(_steps(run)) >= stopped + 3, signal.SIGTERM
    )
    assert code == 128 + signal.SIGTERM, err
    again = json.loads((run / "run.json").read_text())["step"]
    assert again > stopped and _steps(run) == list(range(1, again + 1))


def test_a_second_ctrl_c_stops_at_once_and_run_json_names_the_checkpoint_kept(corpus, tmp_path):
    run = tmp_path / "run"
    p = _train(corpus, run)
    deadline = time.monotonic() + 240
    while len(_steps(run)) < 2:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-2000:]
        time.sleep(0.2)
    # Two signals in one instant: the second lands before the loop reaches its next step.
    os.killpg(p.pid, signal.SIGINT)
    time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted", info
    kept = info["step"]
    # Either the first signal's checkpoint was written in time, or none was.
    assert kept in (0, *_steps(run)), info
    assert err.strip().splitlines()[-1].startswith("interrupted")


def test_ctrl_c_during_a_niah_evaluation_exits_130_and_writes_nothing(corpus, tmp_path):
    """Stopped while XLA runs its decode steps: one line, 130 (not a crash in XLA's
    threads at exit), and no results file (a call that fails writes nothing)."""
    from test_niah import _pico_run

    run = _pico_run(tmp_path, corpus)
    cache = tmp_path / "xla"
    env = {**os.environ, "TTT_COMPILE_CACHE": str(cache)}
    p = _start(["eval", str(run), "--task", "niah", "--seq-len", "512", "--samples", "50"], env=env)
    code, err, took = _interrupt_when(
        p, lambda: any((cache / "executables").glob("decode-feed-*.bin"))
    )
    assert code == 130 and took < 10, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert not (run / "eval" / "niah.parquet").exists()
