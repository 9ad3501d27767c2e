"""Faults of real machines, injected for real: a checkpoint cut short on disk, a full or
read-only disk, a tracking server that goes away. Each ends in at most a few lines and no
traceback, and the same command afterwards resumes and finishes."""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import PICO_TRAIN, serves, wait_until

from sweeps.status import sweep_status
from sweeps.trial import add_older_checkpoints
from ttt import tags as TAG
from ttt.cli import main
from ttt.errors import StorageError, UserError, writing
from ttt.rundir import MANIFEST, RunDir
from ttt.tracking import MlflowRun, run_tags
from ttt.tracking.queue import (
    BEHIND,
    META,
    PENDING,
    REJECTED,
    SPOOL,
    WriteQueue,
    behind_line,
    sweep_queue_folder,
)
from ttt.tracking.tracker import apply_record
from ttt.train.checkpoint import (
    Checkpoints,
    check_manifest,
    read_first_readable,
    write_manifest,
)

# -- checkpoints known complete ------------------------------------------------------------


def _fake_checkpoint(step_dir):
    (step_dir / "params" / "d").mkdir(parents=True)
    (step_dir / "params" / "d" / "blob").write_bytes(b"x" * 1000)
    (step_dir / "meta").mkdir()
    (step_dir / "meta" / "metadata").write_text('{"step": 1}')
    write_manifest(step_dir)


def test_a_manifest_names_a_file_cut_short_or_changed(tmp_path):
    step = tmp_path / "4"
    _fake_checkpoint(step)
    files = json.loads((step / MANIFEST).read_text())["files"]
    assert set(files) == {"params/d/blob", "meta/metadata"}
    assert check_manifest(step) is None
    blob = step / "params" / "d" / "blob"
    blob.write_bytes(b"y" * 1000)  # same size, other bytes
    assert check_manifest(step) == "params/d/blob differs from its checksum"
    blob.write_bytes(b"x" * 10)
    assert check_manifest(step) == "params/d/blob is 10 bytes, 1000 when written"
    blob.unlink()
    assert check_manifest(step) == "params/d/blob is missing"
    assert check_manifest(tmp_path / "no-manifest") is None  # older checkpoints: Orbax decides


def test_the_newest_readable_checkpoint_is_used_with_one_warning(tmp_path, capsys):
    skipped = []

    def read(step):
        if step == 6:
            raise ValueError("OUT_OF_RANGE: Error reading\nand much more")
        return f"state {step}"

    step, value = read_first_readable(tmp_path, [2, 6, 4], read, "resuming", skipped.append)
    assert (step, value, skipped) == (4, "state 4", [6])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(tmp_path / "6") in err[0] and "OUT_OF_RANGE" in err[0], err
    assert "resuming from step 4" in err[0]

    def never(step):
        raise ValueError(f"bad {step}")

    with pytest.raises(UserError) as e:
        read_first_readable(tmp_path, [2, 4], never, "resuming")
    listed = f"{tmp_path / '4'}: bad 4; {tmp_path / '2'}: bad 2"
    assert str(e.value) == f"no checkpoint in {tmp_path} can be read ({listed})"


def test_a_trial_gets_the_older_tune_checkpoint_beside_the_latest(tmp_path):
    older = RunDir(tmp_path / "checkpoint_000001")
    _fake_checkpoint(older.checkpoint(2))
    run = RunDir(tmp_path / "run")
    _fake_checkpoint(run.checkpoint(4))
    add_older_checkpoints(run.path, [older.path])
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["2", "4"]
    assert check_manifest(run.checkpoint(2)) is None


def _cut_short(step_dir):
    """The largest file of a checkpoint's weights truncated, as a crash mid-write leaves it."""
    files = sorted((step_dir / "params").rglob("*"), key=lambda p: p.stat().st_size)
    biggest = files[-1]
    with biggest.open("r+b") as f:
        f.truncate(1000)
    return biggest


def _ttt(args) -> subprocess.CompletedProcess:
    """The command in a process of its own: everything it prints, Orbax's logs and
    threads' errors included (pytest's capture would take some of them)."""
    return subprocess.run(
        [sys.executable, "-m", "ttt.cli", *args], capture_output=True, text=True, timeout=600
    )


def _problem_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def _train_args(train_cfg, out, steps=4):
    source = train_cfg().data.source
    args = ["train", "pico", *PICO_TRAIN, f"data.source={source}", "-q", "--out", str(out)]
    return [
        *args,
        f"train.steps={steps}",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
        "train.log_every=1",
    ]


@pytest.mark.slow
def test_a_truncated_checkpoint_falls_back_to_the_one_before(train_cfg, tmp_path, capfd):
    out = tmp_path / "r"
    args = _train_args(train_cfg, out)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    capfd.readouterr()
    run = RunDir(out)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["2", "4"]
    assert all((run.checkpoint(s) / MANIFEST).is_file() for s in (2, 4))
    both = tmp_path / "both"
    shutil.copytree(out, both)

    # ttt eval reads the weights of step 2, with one warning naming step 4
    _cut_short(run.checkpoint(4))
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(out), "--max-batches", "1"])
    err = capfd.readouterr().err
    assert exc.value.code == 0, err
    lines = _problem_lines(err)
    assert "Traceback" not in err and len(lines) <= 3, err
    assert any(str(run.checkpoint(4)) in ln and "unreadable" in ln for ln in lines), err

    # the same training command resumes from step 2 and finishes
    cap = _ttt(args)
    assert cap.returncode == 0, cap.stderr
    lines = _problem_lines(cap.stderr)
    assert "Traceback" not in cap.stderr and len(lines) <= 3, cap.stderr
    assert "resuming from step 2" in lines[0] and str(run.checkpoint(4)) in lines[0], lines
    assert "finished at step 4" in cap.stdout
    assert run.unreadable_checkpoint(4).is_dir() and check_manifest(run.checkpoint(4)) is None
    records = map(json.loads, run.metrics_file.read_text().splitlines())
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # each step once

    # none readable: one line naming each and why, exit 2
    for step in (2, 4):
        _cut_short(RunDir(both).checkpoint(step))
    with pytest.raises(SystemExit) as exc:
        main(_train_args(train_cfg, both))
    err = capfd.readouterr().err
    lines = _problem_lines(err)
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert (
        str(RunDir(both).checkpoint(4)) in lines[0] and str(RunDir(both).checkpoint(2)) in lines[0]
    )


# -- storage errors in one line ------------------------------------------------------------


def test_a_refused_write_is_one_line_naming_what_where_and_the_free_space(tmp_path):
    where = tmp_path / "r" / "metrics.jsonl"  # not there yet: its folder's free space
    with pytest.raises(StorageError) as e:
        with writing("metrics", where):
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
    line = str(e.value)
    assert line.startswith(f"could not write metrics to {where}: no space left on device (")
    assert " free)" in line and "\n" not in line and e.value.exit_code == 1
    # TensorStore's way of saying it (Orbax's writes), and the other storage errors
    text = "RESOURCE_EXHAUSTED: Error writing x: [OS error 28: No space left on device]"
    for raised, words in [
        (ValueError(text), "no space left on device"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    ]:
        with pytest.raises(StorageError, match=words):
            with writing("checkpoint step 4", tmp_path):
                raise raised
    with pytest.raises(KeyError):  # anything else is not a storage error
        with writing("metrics", tmp_path):
            raise KeyError("step")
    with pytest.raises(FileNotFoundError):
        with writing("metrics", tmp_path):
            raise FileNotFoundError(errno.ENOENT, "No such file")


def _refuse_checkpoint(monkeypatch, at_step: int):
    """Checkpoints.save fails at `at_step` with ENOSPC, leaving Orbax's temporary folder."""
    real = Checkpoints.save

    def save(self, step, *args, **kwargs):
        if step == at_step:
            (self.directory / f"{step}.orbax-checkpoint-tmp-1").mkdir()
            raise ValueError(
                f"RESOURCE_EXHAUSTED: Error writing in OCDBT database at {self.directory}: "
                "[OS error 28: No space left on device]"
            )
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", save)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(
    train_cfg, tmp_path, capfd, monkeypatch
):
    out = tmp_path / "r"
    args = _train_args(train_cfg, out)
    _refuse_checkpoint(monkeypatch, at_step=4)
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capfd.readouterr().err
    lines = _problem_lines(err)
    assert exc.value.code == 1 and len(lines) <= 3 and "Traceback" not in err, err
    (line,) = [ln for ln in lines if ln.startswith("error: ")]
    assert f"could not write checkpoint step 4 to {RunDir(out).checkpoints}" in line, line
    assert "no space left on device" in line and " free)" in line, line
    assert "last complete checkpoint: step 2" in line, line
    run = RunDir(out)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["2"]  # temporary folder gone
    info = run.info()
    assert info["status"] == "failed" and info["step"] == 2 and info["message"] in line
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exc:
        main(args)
    cap = capfd.readouterr()
    assert exc.value.code == 0 and "finished at step 4" in cap.out, cap.err


def _mount_small_disk(folder, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the ENOSPC write path is unit-tested")
    folder.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")


@pytest.mark.slow
def test_ttt_train_on_a_filesystem_that_fills_up(train_cfg, tmp_path, capfd):
    """A real 4 MB filesystem: the first checkpoint (about 2.6 MB at pico) fits, the
    second does not. One line, exit 1; once there is room the same command finishes."""
    disk = tmp_path / "disk"
    _mount_small_disk(disk, "4m")
    try:
        out = disk / "r"
        args = _train_args(train_cfg, out)
        cap = _ttt(args)
        err = cap.stderr
        lines = _problem_lines(err)
        assert cap.returncode == 1 and len(lines) <= 3 and "Traceback" not in err, err
        (line,) = [ln for ln in lines if ln.startswith("error: ")]
        assert "no space left on device" in line and "last complete checkpoint: step 2" in line
        assert RunDir(out).info()["status"] == "failed"
        assert sorted(p.name for p in RunDir(out).checkpoints.iterdir()) == ["2"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        with pytest.raises(SystemExit) as exc:
            main(args)
        cap = capfd.readouterr()
        assert exc.value.code == 0 and "finished at step 4" in cap.out, cap.err
        assert RunDir(out).info()["status"] == "finished"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- tracking that never blocks training -------------------------------------------------


class _Refused(Exception):
    error_code = "INVALID_PARAMETER_VALUE"


class _FlakyServer:
    """`send` for a WriteQueue: away (ConnectionError) while `down`, refusing a request
    that changes param `a`, keeping the steps of the rest in order."""

    def __init__(self):
        self.down, self.got, self.calls, self.requests = False, [], 0, 0

    def __call__(self, record):
        self.calls += 1
        if self.down:
            raise ConnectionError("HTTPConnectionPool: [Errno 111] Connection refused')")
        if ["a", "2"] in record.get("params", []):
            raise _Refused("param 'a' was 1, cannot change it to 2")
        self.requests += 1
        self.got += [m[3] for m in record.get("metrics", [])]


def _report(n, **more):
    return {"op": "log_batch", "run_id": "r", "metrics": [["loss", 1.0, 0, n]], **more}


def test_a_queue_keeps_records_in_order_while_the_server_is_away(tmp_path, capsys):
    server, out = _FlakyServer(), io.StringIO()
    q = WriteQueue(server, tmp_path / "q", "http://x", memory=3, retry_max=0.05, out=out)
    server.down = True
    started = time.perf_counter()
    for n in range(10):
        q.submit(_report(n))
    assert time.perf_counter() - started < 0.5  # nothing waits on the server
    wait_until(lambda: "tracking is behind" in out.getvalue(), "the behind line", 10, 0.05)
    assert len((tmp_path / "q" / SPOOL).read_text().splitlines()) == 7  # past 3 in memory
    assert "http://x cannot be reached (Connection refused)" in behind_line(tmp_path / "q")
    wait_until(lambda: server.calls > 5, "retries", 10, 0.05)
    assert out.getvalue().count("tracking is behind") == 1  # not repeated per retry
    q.submit(_report(10, params=[["a", "2"]]))
    q.submit(_report(11))
    server.down = False
    assert q.drain(10)
    assert server.got == list(range(10)) + [11]
    assert server.requests < 12  # consecutive reports of a run go out as one request
    assert "caught up" in out.getvalue() and behind_line(tmp_path / "q") is None
    rejected = (tmp_path / "q" / REJECTED).read_text().splitlines()
    assert len(rejected) == 1 and json.loads(rejected[0])["metrics"][0][3] == 10
    assert "refused a record for good (param 'a' was 1" in out.getvalue()
    # the end while the server is away: drained for a bounded time, the rest kept on disk
    server.down = True
    for n in range(12, 15):
        q.submit(_report(n))
    assert q.close(timeout=0.3) == 3
    assert len((tmp_path / "q" / PENDING).read_text().splitlines()) == 3
    assert "3 records not sent to http://x" in out.getvalue()
    assert "ttt tracking flush" in behind_line(tmp_path / "q")
    # a queue killed with records on disk (every record is, by default): the next one
    # on the folder sends those the server had not had, once
    server.down = False
    killed = WriteQueue(server, tmp_path / "k", "http://x", retry_max=0.05, out=out)
    killed.submit(_report(100))
    assert killed.drain(10)
    server.down = True
    for n in (101, 102):
        killed.submit(_report(n))
    with (tmp_path / "k" / SPOOL).open("a") as f:
        f.write('{"op": "log_ba')  # a line cut short by the kill
    killed.stopping = True  # the process gone: nothing more is sent or tidied
    server.down = False
    after = WriteQueue(server, tmp_path / "k", "http://x", out=out)
    assert after.drain(10) and server.got[-3:] == [100, 101, 102]  # 100 once, before the kill
    # the next queue on the folder (the same command again, or flush) sends them first
    server.down = False
    again = WriteQueue(server, tmp_path / "q", "http://x", out=out)
    again.submit(_report(15))
    assert again.close(timeout=10) == 0
    assert server.got[-4:] == [12, 13, 14, 15] and not (tmp_path / "q" / PENDING).exists()


class _Server:
    """A real `ttt tracking serve` on 127.0.0.1, stopped and started again on the same port
    and store."""

    def __init__(self, folder):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.proc = folder, None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ttt.cli", "tracking", "serve", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

        wait_until(lambda: serves(self.url), "the tracking server", 120)

    def stop(self):
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server(tmp_path):
    s = _Server(tmp_path)
    s.start()
    yield s
    s.stop()


@pytest.mark.slow
def test_a_run_goes_on_while_a_real_server_is_stopped_and_started(
    server, tmp_path, monkeypatch, capfd
):
    """Reports to a `ttt tracking serve` that is killed and started again: none waits, all
    arrive in order; a record refused for good is kept and named; what is left at the end
    goes out with `ttt tracking flush`."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = MlflowRun.open(server.url, "faults", {"ttt.key": "q"}, name="q")
    out = io.StringIO()
    folder = tmp_path / "queue"
    q = WriteQueue(
        functools.partial(apply_record, run.c), folder, server.url, memory=5, retry_max=1, out=out
    )
    run.through(q)
    run.log_hyperparameters({"a": 1})
    for step in range(1, 4):
        run.log({"loss": 10.0 - step}, step)
    assert q.drain(60)
    server.stop()
    waited = []
    for step in range(4, 21):
        t = time.perf_counter()
        run.log({"loss": 10.0 - step}, step)
        waited.append(time.perf_counter() - t)
    assert max(waited) < 0.2, waited  # the loop never waits on the server
    wait_until(lambda: "tracking is behind" in out.getvalue(), "the behind line", 60, 0.2)
    assert (folder / SPOOL).is_file() and "cannot be reached" in behind_line(folder)
    server.start()
    run.log_hyperparameters({"a": 2})  # a param cannot change: refused for good
    run.log({"loss": -11.0}, 21)
    assert q.drain(120), out.getvalue()
    history = run.c.get_metric_history(run.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 22))
    assert "caught up" in out.getvalue() and (folder / REJECTED).is_file()
    assert "refused a record for good" in out.getvalue()
    # the end of a run while the server is away: bounded, then flushed by the command
    server.stop()
    for step in range(22, 25):
        run.log({"loss": 10.0 - step}, step)
    run.finish("finished")
    assert q.close(timeout=3) == 5  # three reports, the outcome tag, the status
    assert "ttt tracking flush" in out.getvalue()
    server.start()
    capfd.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["tracking", "flush", str(folder)])
    cap = capfd.readouterr()
    assert exc.value.code == 0 and "5 records sent" in cap.out, cap
    history = run.c.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))
    assert run.c.get_run(run.run_id).info.status == "FINISHED"


def test_sweep_status_says_when_the_record_is_behind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "ray")
    tags = {**run_tags("sweep", "test"), TAG.SWEEP: "late", TAG.STORAGE_PATH: storage}
    MlflowRun.open(uri, "late", {TAG.SWEEP: "late"}, name="late", tags=tags)
    assert "behind" not in sweep_status("late", uri)
    folder = sweep_queue_folder(storage, "late")
    assert folder == tmp_path / "ray" / "late" / "tracking-queue"
    folder.mkdir(parents=True)
    (folder / META).write_text(json.dumps({"uri": "http://x"}))
    state = {"since": time.time(), "reason": "Connection refused", "where": "http://x"}
    (folder / BEHIND).write_text(json.dumps(state))
    line = sweep_status("late", uri).splitlines()[-2]  # above "(read from URI)"
    assert line.startswith("tracking is behind since ") and "http://x cannot be reached" in line
    (folder / BEHIND).unlink()
    (folder / PENDING).write_text('{"op": "log_batch"}\n{"op": "log_batch"}\n')
    line = sweep_status("late", uri).splitlines()[-2]  # above "(read from URI)"
    assert line == (
        f"tracking is behind: 2 records not yet sent are kept in {folder}; "
        f"`ttt tracking flush {folder}` sends them"
    )


def test_a_full_disk_under_the_tracking_spool_is_one_storage_line(tmp_path, monkeypatch):
    q = WriteQueue(_FlakyServer(), tmp_path / "q", "http://x")
    real_open = type(tmp_path).open

    def full(self, mode="r", *args, **kwargs):
        if self.name == SPOOL and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "open", full)
    with pytest.raises(StorageError, match="could not write tracking records to .*spool.jsonl"):
        q.submit(_report(1))
    monkeypatch.undo()
    assert q.close(5) == 0
