"""Process-wide state, changed here and nowhere else: the environment variables the
libraries underneath read, signal handlers, where stdout and stderr go, logging filters
and `jax.config`.

Each change is a named function that an entry point calls (the CLI's commands, a sweep's
driver, a trial, the local cluster's keeper); nothing changes process state when a module
is imported. `ttt.settings` is the other half: the one place that reads `TTT_*`.
`tests/test_structure.py` fails on a write anywhere else.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def set_env(name: str, value: str, *, keep: bool = False) -> None:
    """Set an environment variable for this process and the ones it starts; `keep`: only
    where the user has not set it."""
    if keep:
        os.environ.setdefault(name, value)
    else:
        os.environ[name] = value


def ray_env() -> None:
    """What Ray reads once, when it is imported: call before `import ray`. Ray folds alike
    log lines of different trials into "[repeated Nx across cluster]", which hides the
    per-trial progress lines."""
    set_env("RAY_DEDUP_LOGS", "0", keep=True)


# A trial given a share of a GPU may use this much of that share of its memory.
GPU_SHARE_OF_MEMORY = 0.95


def tracking_env() -> None:
    """MLflow's client tries a request 7 times over about 4 minutes before it raises.
    Writes go through `ttt.tracking.queue`, which keeps trying on its own thread, so a
    few tries are enough: it then knows in seconds that the server is away, and says so."""
    set_env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2", keep=True)
    set_env("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1", keep=True)
    # the queue's one line says it; urllib3's warning per retried request would repeat it
    add_log_filter("urllib3.connectionpool", _NoRetryWarnings())


class _NoRetryWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Retrying (")


class _StorageNoise(logging.Filter):
    """Orbax's own error logs (tracebacks of its writer threads) for a write the disk
    refused: the command says it in one line (`ttt.errors.StorageError`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ttt.errors import storage_errno  # deferred: the bottom layer imports nothing

        error = record.exc_info[1] if record.exc_info else None
        if error is not None and storage_errno(error) is not None:
            return False
        return storage_errno(Exception(record.getMessage())) is None


def _drop_closed_loop_noise(previous: Callable) -> Callable:
    def hook(unraisable) -> None:
        # TensorStore calling back into an event loop Orbax closed after a failed write
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
            return
        previous(unraisable)

    hook.drops_closed_loop_noise = True
    return hook


def quiet_checkpoint_errors() -> None:
    """A checkpoint the disk refuses is one line from the command, not Orbax's hundreds:
    its error logs of that failure filtered, and the closed-event-loop errors its writer
    threads leave behind not printed."""
    add_log_filter("absl", _StorageNoise())
    if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)


def trial_env(gpu: float) -> None:
    """Before JAX starts in a sweep trial's worker: share a GPU safely (its fraction of
    the memory, no preallocation), or keep JAX off a GPU the trial was not given."""
    if 0 < gpu < 1:
        set_env("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        set_env("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_SHARE_OF_MEMORY * gpu:.3f}")
    if gpu == 0 and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        set_env("JAX_PLATFORMS", "cpu", keep=True)


def jax_option(name: str, value) -> None:
    """`jax.config.update`, the one place it is called."""
    import jax  # deferred: the CLI's light commands never start JAX

    jax.config.update(name, value)


@contextmanager
def signal_handlers(handlers: dict[int, Callable]) -> Iterator[dict]:
    """Install `handlers` (signal number -> handler) while the block runs, then put back
    the ones before; yields those. Only the main thread may own signal handlers."""
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield previous
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def set_signal_handlers(handlers: dict[int, Callable]) -> dict:
    """Install `handlers` for the rest of the process (a keeper's shutdown, a driver's
    stop); returns the ones they replace."""
    return {s: signal.signal(s, h) for s, h in handlers.items()}


@contextmanager
def redirect_output(wrap: Callable) -> Iterator[None]:
    """sys.stdout and sys.stderr replaced by `wrap(stream)` while the block runs (a
    driver's log copied to a file), then put back."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = wrap(sys.stdout), wrap(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


def add_log_filter(logger: str, log_filter: logging.Filter) -> None:
    """A filter on a library's logger, once (calling again with one of its class adds
    nothing)."""
    target = logging.getLogger(logger)
    if not any(type(f) is type(log_filter) for f in target.filters):
        target.addFilter(log_filter)
