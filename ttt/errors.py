"""User errors: anything a user can fix by changing an input. The CLI prints the message
as one line and exits with code 2, never with a traceback. Storage errors (a full disk, a
read-only or forbidden folder, a quota) are one line too, with exit code 1."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    exit_code = 2


class Interrupted(Exception):
    """A command stopped by a signal. The CLI prints the message as one line (what was
    kept and how to go on) and exits with 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str = "interrupted", signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum


# What would fit instead, by command, when a device runs out of memory.
OOM_HINTS = {
    "train": "a smaller data.batch_size (with train.grad_accum), model.remat=block, or a "
    "shorter data.seq_len",
    "eval": "a shorter --seq-len or a smaller --batch-size; full attention's memory grows with "
    "the context, swa and ttt_e2e keep a fixed state",
    "generate": "a shorter prompt or fewer --max-new-tokens; full attention's cache grows with "
    "the context, swa and ttt_e2e keep a fixed state",
}


def out_of_memory(e: BaseException, command: str) -> str | None:
    """One line for an XLA out-of-memory error (what did not fit, and what would); None
    for any other error."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "Out of memory" in ln), lines[0])
    detail = detail.replace("RESOURCE_EXHAUSTED: ", "")[:200]
    hint = OOM_HINTS.get(command, "smaller shapes")
    return f"out of memory: {detail}; try {hint}"


# The storage errors a user fixes outside the program: the OS's words for each.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
# TensorStore (Orbax's writer) raises them as ValueError or RuntimeError with the OS's
# message in the text ("RESOURCE_EXHAUSTED: Error writing ...: [OS error 28: No space
# left on device]"), not as OSError.
_STORAGE_TEXT = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
}


class StorageError(UserError):
    """A write that the disk refused (full, read-only, forbidden, over quota): one line
    naming what was being written and where, the error and the free space there; exit 1.
    Whoever knows what is safe (the trainer: the last complete checkpoint) adds it."""

    exit_code = 1

    def __init__(self, message: str, errno_: int, where: Path):
        super().__init__(message)
        self.errno, self.where = errno_, where


def storage_errno(e: BaseException) -> int | None:
    """The storage error behind `e` (itself, its cause or its context), None if none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        if not isinstance(e, OSError):
            text = str(e).lower()
            for words, code in _STORAGE_TEXT.items():
                if words in text:
                    return code
        e = e.__cause__ or e.__context__
    return None


def free_space(where: Path) -> str:
    """The free space of the filesystem holding `where` (its nearest existing folder)."""
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
        free /= 1024
    return ""  # not reached


def storage_error(e: BaseException, what: str, where: Path) -> StorageError | None:
    """The one-line error for a storage failure while writing `what` to `where`, None for
    any other error."""
    code = storage_errno(e)
    if code is None:
        return None
    line = f"could not write {what} to {where}: {STORAGE_ERRNOS[code]} ({free_space(where)})"
    return StorageError(line, code, Path(where))


@contextmanager
def writing(what: str, where: Path) -> Iterator[None]:
    """A storage error raised in the block becomes a `StorageError` naming `what` and
    `where`; any other error passes unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        error = storage_error(e, what, where)
        if error is None:
            raise
        raise error from None
