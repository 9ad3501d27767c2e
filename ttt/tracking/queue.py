"""Tracking that never blocks training: MLflow writes through a queue on a background
thread, kept in order while the server is away.

`WriteQueue.submit(record)` returns at once. One thread sends the records in the order
they came, through `send(record)` (`ttt.tracking.tracker.apply_record` on a client). While
the server cannot be reached the record at the head is tried again (with a growing pause)
and nothing behind it is sent. Records past `memory` in memory (by default every one) go
to a spool file on disk, under the run's or the sweep's folder, with the count of bytes
the server has beside it: a process killed with records not yet sent leaves them there,
and the next queue on the folder sends them. One line says that tracking is behind and
why, repeated at most every `notice_every` seconds. A record the server refuses for good
(a bad value, a run that is gone) is kept in `rejected.jsonl` and named in one line.

`close(timeout)` drains for at most `timeout` seconds, then writes what is left to
`pending.jsonl` and says so; a queue opened on the same folder (the same command run
again, or `ttt tracking flush DIR`) sends those records first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ttt.errors import writing

SPOOL, SENT, PENDING, REJECTED, ARTIFACTS, META, BEHIND = (
    "spool.jsonl",
    "spool.sent",  # how many bytes of the spool the server has: a killed queue resumes there
    "pending.jsonl",
    "rejected.jsonl",
    "artifacts",
    "meta.json",
    "behind.json",  # while the server is away: since when, and why (`ttt sweep status`)
)
# MLflow's error codes for a request the server will refuse however often it is sent.
PERMANENT = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


# How many queued records one request may take (`merge`).
MERGE_AHEAD = 200


def refused_for_good(e: BaseException) -> bool:
    """A refusal that sending again cannot change (not a server that is away)."""
    code = getattr(e, "error_code", None)
    return isinstance(code, str) and code in PERMANENT


def _reason(e: BaseException) -> str:
    """The error in a few words: the OS's, where a connection failed (MLflow wraps it in
    two layers of retry messages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    os_error = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    return os_error.group(1).strip() if os_error else text[:200]


# A request MLflow takes at once: up to 1000 metrics, 100 params and 100 tags.
MERGE_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}


def merge(records: list[dict]) -> tuple[dict, int]:
    """The longest run of `log_batch` records of one run at the head of `records` that
    fits one request, as one record; and how many it took (1 for any other record)."""
    head = records[0]
    if head.get("op") != "log_batch":
        return head, 1
    merged = {"op": "log_batch", "run_id": head["run_id"]}
    taken = 0
    for r in records:
        if r.get("op") != "log_batch" or r["run_id"] != head["run_id"]:
            break
        sizes = {k: len(merged.get(k, ())) + len(r.get(k, ())) for k in MERGE_LIMITS}
        if taken and any(sizes[k] > MERGE_LIMITS[k] for k in MERGE_LIMITS):
            break
        tag_keys = {t[0] for t in merged.get("tags", ())}
        if taken and any(t[0] in tag_keys for t in r.get("tags", ())):
            break  # a tag set twice in one request: MLflow may keep either
        for k in MERGE_LIMITS:
            if r.get(k):
                merged.setdefault(k, []).extend(r[k])
        taken += 1
    return merged, taken


def sweep_queue_folder(storage: str, sweep: str) -> Path:
    """A sweep's tracking queue: in its Tune folder where that is a local path, else in the
    driver's temporary folder (a cloud store cannot hold an append-only spool)."""
    if "://" in storage and not storage.startswith("file://"):
        return Path(tempfile.gettempdir()) / "ttt-tracking" / sweep
    return Path(storage.removeprefix("file://")) / sweep / "tracking-queue"


def behind_line(folder: Path) -> str | None:
    """One line when a queue's folder says its records are behind the server, else None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    n = pending_records(folder, live=False)  # a live queue's spool is behind only by ms
    state = folder / BEHIND
    if state.is_file():
        info = json.loads(state.read_text())
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        where = info.get("where", "the tracking server")
        return (
            f"tracking is behind since {since}: {where} cannot be reached ({info['reason']}); "
            f"the records are kept in order in {folder} and sent when it answers"
        )
    if n:
        return (
            f"tracking is behind: {n} records not yet sent are kept in {folder}; "
            f"`ttt tracking flush {folder}` sends them"
        )
    return None


def pending_records(folder: Path, live: bool = True) -> int:
    """How many records a queue's folder holds that the server has not been sent: those
    a closed queue left, and with `live` those of its spool past the bytes sent."""
    folder = Path(folder)
    n = 0
    if (folder / PENDING).is_file():
        n += sum(1 for line in (folder / PENDING).read_text().splitlines() if line.strip())
    if live and (folder / SPOOL).is_file():
        sent = folder / SENT
        start = int(sent.read_text() or 0) if sent.is_file() else 0
        with (folder / SPOOL).open("rb") as f:
            f.seek(start)
            n += sum(1 for line in f.read().splitlines() if line.strip())
    return n


class WriteQueue:
    def __init__(
        self,
        send: Callable[[dict], None],
        folder: Path,
        where: str = "",
        *,
        memory: int = 0,
        notice_every: float = 300.0,
        retry_max: float = 10.0,
        out=None,
    ):
        self.send, self.folder, self.where = send, Path(folder), where
        self.memory, self.notice_every, self.retry_max = memory, notice_every, retry_max
        self.out = out  # where the lines go (default: stderr at the time of writing)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / META).write_text(json.dumps({"uri": where}))
        self.lock = threading.Condition()
        self.mem: deque[dict] = deque()
        self.spooled, self.offset = 0, 0  # records in the spool file, bytes already sent
        self.sent = 0
        self.rejected = 0
        self.behind_since: float | None = None
        self.last_notice = 0.0
        self.stopping = False
        self.seq = 0
        self._load_left_over()
        self.thread = threading.Thread(target=self._work, name="ttt-tracking", daemon=True)
        self.thread.start()

    # -- the caller's side ---------------------------------------------------------------

    def submit(self, record: dict) -> None:
        """Queue one record; never waits on the network."""
        if record.get("op") == "log_artifact":
            record = self._keep_artifact(record)
        with self.lock:
            if self.spooled or len(self.mem) >= self.memory:
                with writing("tracking records", self.folder / SPOOL):
                    with (self.folder / SPOOL).open("a") as f:
                        f.write(json.dumps(record) + "\n")
                self.spooled += 1
            else:
                self.mem.append(record)
            self.lock.notify_all()

    def pending(self) -> int:
        with self.lock:
            return len(self.mem) + self.spooled

    def behind(self) -> bool:
        return self.behind_since is not None

    def drain(self, timeout: float) -> bool:
        """Wait until every record is sent, at most `timeout` seconds; True when all are."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.mem or self.spooled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, 0.5))
        return True

    def close(self, timeout: float = 60.0) -> int:
        """Drain for at most `timeout` s; what is left goes to pending.jsonl, named in one
        line. Returns how many records are left."""
        done = self.drain(timeout)
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
            if done:
                self._tidy()
                return 0
            left = list(self.mem) + self._spool_lines()
            with writing("tracking records", self.folder / PENDING):
                with (self.folder / PENDING).open("w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in left)
            (self.folder / SPOOL).unlink(missing_ok=True)
            (self.folder / SENT).unlink(missing_ok=True)
            (self.folder / BEHIND).unlink(missing_ok=True)
            self.mem.clear()
            self.spooled = self.offset = 0
        self._say(
            f"tracking is behind: {len(left)} records not sent to {self.where} are kept in "
            f"{self.folder / PENDING}; `ttt tracking flush {self.folder}` sends them (the "
            "same command run again sends them first)"
        )
        return len(left)

    # -- the thread ----------------------------------------------------------------------

    def _work(self) -> None:
        pause = min(1.0, self.retry_max)
        merge_ahead = MERGE_AHEAD
        while True:
            with self.lock:
                while not (self.mem or self.spooled) and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return
                heads = self._heads(merge_ahead)
            record, taken = merge(heads)
            try:
                self.send(record)
            except Exception as e:
                if refused_for_good(e) and taken > 1:
                    merge_ahead = 1  # which of the merged records? send them one by one
                    continue
                if refused_for_good(e):
                    self._reject(record, e)
                else:
                    self._away(e)
                    time.sleep(pause)
                    pause = min(pause * 2, self.retry_max)
                    continue
            pause = min(1.0, self.retry_max)
            merge_ahead = MERGE_AHEAD if taken == 1 and merge_ahead == 1 else merge_ahead
            with self.lock:
                if self.stopping:
                    return
                for _ in range(taken):
                    self._pop()
                self.sent += taken
                if self.behind_since is not None and not (self.mem or self.spooled):
                    waited = time.monotonic() - self.behind_since
                    self.behind_since = None
                    (self.folder / BEHIND).unlink(missing_ok=True)
                    self._say(f"tracking caught up with {self.where} after {waited:.0f} s")
                self.lock.notify_all()
            for r in heads[:taken]:
                self._drop_artifact(r)

    def _heads(self, n: int) -> list[dict]:
        """Up to `n` records from the head, in order (memory first, then the spool)."""
        out = list(self.mem)[:n]
        if len(out) < n and self.spooled:
            self._lens = []
            with (self.folder / SPOOL).open("rb") as f:
                f.seek(self.offset)
                for _ in range(min(n - len(out), self.spooled)):
                    line = f.readline()
                    self._lens.append(len(line))
                    out.append(json.loads(line))
        return out

    def _pop(self) -> None:
        if self.mem:
            self.mem.popleft()
            return
        self.offset += self._lens.pop(0)
        self.spooled -= 1
        if not self.spooled:
            (self.folder / SPOOL).unlink(missing_ok=True)
            (self.folder / SENT).unlink(missing_ok=True)
            self.offset = 0
            return
        tmp = self.folder / f".{SENT}.tmp"
        tmp.write_text(str(self.offset))
        os.replace(tmp, self.folder / SENT)

    def _spool_lines(self) -> list[dict]:
        path = self.folder / SPOOL
        if not self.spooled or not path.is_file():
            return []
        with path.open("rb") as f:
            f.seek(self.offset)
            return [json.loads(line) for line in f.read().splitlines() if line.strip()]

    def _away(self, e: Exception) -> None:
        now = time.monotonic()
        if self.behind_since is None:
            self.behind_since = now
            state = {"since": time.time(), "reason": _reason(e), "where": self.where}
            (self.folder / BEHIND).write_text(json.dumps(state))
        if now - self.last_notice >= self.notice_every:
            self.last_notice = now
            self._say(
                f"tracking is behind: {self.where} cannot be reached ({_reason(e)}); "
                f"{self.pending()} records kept in order ({self.folder}); training goes on"
            )

    def _reject(self, record: dict, e: Exception) -> None:
        with (self.folder / REJECTED).open("a") as f:
            f.write(json.dumps({**record, "error": _reason(e)}) + "\n")
        self.rejected += 1
        self._say(
            f"tracking: {self.where} refused a record for good ({_reason(e)}); it is kept in "
            f"{self.folder / REJECTED}"
        )

    def _say(self, line: str) -> None:
        print(line, file=self.out or sys.stderr, flush=True)

    # -- files -----------------------------------------------------------------------------

    def _load_left_over(self) -> None:
        """A previous queue's records are sent first, in their order: pending.jsonl (left
        at its close), then what its spool held past the bytes sent (a killed process;
        a line cut short by the kill is dropped)."""
        pending, spool, sent = (self.folder / n for n in (PENDING, SPOOL, SENT))
        lines = pending.read_text().splitlines() if pending.is_file() else []
        if spool.is_file():
            start = int(sent.read_text() or 0) if sent.is_file() else 0
            with spool.open("rb") as f:
                f.seek(start)
                lines += f.read().decode(errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                continue
            kept.append(line)
        sent.unlink(missing_ok=True)
        if not kept:
            spool.unlink(missing_ok=True)
            pending.unlink(missing_ok=True)
            return
        spool.write_text("".join(ln + "\n" for ln in kept))
        pending.unlink(missing_ok=True)
        self.spooled = len(kept)

    def _keep_artifact(self, record: dict) -> dict:
        """A copy of the file in the queue's folder: the original may be a temporary file
        gone by the time the server is back."""
        with self.lock:
            self.seq += 1
            seq = self.seq
        source = Path(record["path"])
        copy = self.folder / ARTIFACTS / f"{time.time_ns()}-{seq}" / source.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, copy)
        return {**record, "path": str(copy), "kept": True}

    def _drop_artifact(self, record: dict) -> None:
        if record.get("kept"):
            shutil.rmtree(Path(record["path"]).parent, ignore_errors=True)

    def _tidy(self) -> None:
        for name in (SPOOL, SENT, PENDING, BEHIND):
            (self.folder / name).unlink(missing_ok=True)
        artifacts = self.folder / ARTIFACTS
        if artifacts.is_dir() and not any(artifacts.iterdir()):
            artifacts.rmdir()
