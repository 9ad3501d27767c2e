"""Every use of Ray's private modules and undocumented behaviour, in one place.

Ray moves its internals between minor versions, so each use here names the public API it
stands in for and why that is not enough, and importing this module with a Ray outside
the tested range (`TESTED`, the same bounds as pyproject.toml) is one line instead of a
silent misbehaviour later. `TTT_UNTESTED_RAY=1` lets an untested Ray through.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

from ttt import process
from ttt.errors import UserError
from ttt.settings import settings

# The (major, minor) versions of Ray this module was tested with, inclusive; pyproject.toml
# pins the same range.
TESTED = ((2, 60), (2, 60))


def _minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_version(version: str | None = None) -> str:
    """The installed Ray's version; a UserError when it is outside `TESTED` (unless
    TTT_UNTESTED_RAY=1)."""
    try:
        version = version or metadata.version("ray")
    except metadata.PackageNotFoundError:
        raise UserError("Ray is not installed: pip install -e . (see README)") from None
    lo, hi = TESTED
    if not lo <= _minor(version) <= hi and not settings().untested_ray:
        span = ".".join(map(str, lo)) + ("" if lo == hi else "-" + ".".join(map(str, hi)))
        raise UserError(
            f"Ray {version} is installed; ttt is tested with Ray {span}.x (reinstall with "
            "`make install`, or set TTT_UNTESTED_RAY=1 to try this one)"
        )
    return version


check_version()  # a check, not a change: an untested Ray is one line before any other


# --- A cluster on this machine only -----------------------------------------------------
# Public API: `ray start --node-ip-address 127.0.0.1` binds most services to loopback, but
# Ray still swaps 127.0.0.1 for the machine's outward address when a driver or worker
# looks the node up, and lets other machines join. Ray's single-machine switch (meant for
# Windows and macOS, undocumented on Linux) makes every service and lookup loopback-only.
SINGLE_MACHINE = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def loopback_env() -> dict[str, str]:
    """The environment of a process that starts or joins a loopback-only cluster."""
    return {SINGLE_MACHINE[0]: SINGLE_MACHINE[1], "RAY_AUTH_MODE": "token"}


def loopback_mode() -> None:
    """Join a cluster on 127.0.0.1 as one of its processes, in this process: the switch
    above is read into `ray._private.ray_constants` when Ray is imported, so set both."""
    process.set_env(*SINGLE_MACHINE)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


# --- The cluster's auth token -----------------------------------------------------------
# Ray >= 2.59 turns token auth on for the clusters it starts. `ray.init()` creates a token
# when none exists; `ray start` does not, so a fresh machine needs one made first.


def default_token_path() -> Path:
    """Where Ray saves and looks for its token by default (Ray's own rule, in
    ray._private.authentication.authentication_token_setup)."""
    return Path.home() / ".ray" / "auth_token"


def token_source() -> str | None:
    """Where Ray would find a token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token,
    in Ray's order), or None."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        return str(path) if path.is_file() else None
    path = default_token_path()
    return str(path) if path.is_file() else None


def ensure_token() -> Path | None:
    """For a cluster this machine starts: make sure a token exists, creating one with
    Ray's own generator (`ray get-auth-token --generate`, the public CLI, which saves it
    to ~/.ray/auth_token as ray.init() would). The path it created, or None if one was
    there."""
    if token_source() is not None:
        return None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        raise UserError(
            f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}: no such file; point it "
            "at a Ray auth token, or unset it to let ttt create one in ~/.ray/auth_token"
        )
    done = subprocess.run(
        ray_cli("get-auth-token", "--generate"),
        capture_output=True,  # the token itself is printed on stdout
        text=True,
        timeout=120,
    )
    if done.returncode != 0 or not default_token_path().is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not create a Ray auth token (ray get-auth-token): {tail}")
    return default_token_path()


def token_auth() -> None:
    """Send the cluster's token from this process. Public API: RAY_AUTH_MODE=token before
    Ray is imported. Ray reads the mode once, at import, so in a process that imported it
    already, refresh its config and token cache as Ray's own tests do
    (ray._private.authentication_test_utils)."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return
    process.set_env("RAY_AUTH_MODE", "token")
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config  # deferred: only once Ray is imported (checked above)

        Config.initialize("")
        reset_token_cache()


def reset_token_cache() -> None:
    """Forget the token this process loaded (after HOME or RAY_AUTH_TOKEN changed)."""
    if "ray._raylet" in sys.modules:
        # deferred: only once Ray is imported (checked above)
        from ray._raylet import AuthenticationTokenLoader

        AuthenticationTokenLoader.instance().reset_cache()


def ray_cli(*args: str) -> list[str]:
    """The `ray` command of this interpreter's Ray. Public API: the `ray` console script,
    which is on PATH only in an activated venv (not in a job's or keeper's environment);
    Ray ships no `python -m ray`, so this runs the script's module."""
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


# --- Tune ---------------------------------------------------------------------------------


class TrialNamed:
    """Mixin for Tune's function-trainable actor: its repr, which Ray shows as the actor's
    name in the dashboard and as the prefix of its log lines, is the trial's name instead
    of the function's. Public API: none names a trial's actor; Ray's repr of an actor
    reads the trainable's `_name`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._name = f"trial {self.trial_name}"


def name_trial_actors(trainable) -> None:
    """Build `trainable`'s actor class with `TrialNamed` mixed in (Tune's
    `wrap_function` reads the function's undocumented `__mixins__`)."""
    trainable.__mixins__ = (TrialNamed,)


def _on_sigint(signum, frame):
    raise KeyboardInterrupt


def _on_sigterm(signum, frame):
    # `ttt sweep stop`, or Ray stopping the job: stop as on Ctrl-C (Ray blocks SIGINT in
    # the processes it starts, hence the unblock).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.raise_signal(signal.SIGINT)


def fit(tuner):
    """`tuner.fit()`, raising KeyboardInterrupt when it was stopped by a signal. Public
    API: `ResultGrid` does not say whether fit() ended because its trials did or because
    it was stopped (Tune saves its state and returns as if done). Tune's SIGINT handler
    hands the signal back to the previous handler when it fires, which is how a stop is
    told from the end."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        process.set_signal_handlers({signal.SIGINT: _on_sigint, signal.SIGTERM: _on_sigterm})
    grid = tuner.fit()
    if main:
        if signal.getsignal(signal.SIGINT) is _on_sigint:
            raise KeyboardInterrupt
        # Tune leaves its handler installed
        process.set_signal_handlers({signal.SIGINT: _on_sigint})
    return grid
