"""Orbax checkpoints of a run: params, optimizer state, step and data position.

A checkpoint counts once it is complete: Orbax has finalised it (its temporary folder
renamed to the step) and then `manifest.json`, every file's size and SHA-256, is written
last. Reading one checks the manifest first, then Orbax's own reading; a checkpoint that
fails either is unreadable, and the newest readable one kept is used instead (one warning
line naming the one skipped). If none can be read: one line naming each and why, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ttt.errors import UserError
from ttt.rundir import MANIFEST, RunDir

_CHUNK = 1 << 20


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Every file of a finalised checkpoint, with its size and SHA-256, written last and
    atomically (a temporary name, then a rename)."""
    files = {
        str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _digest(p)}
        for p in _files(step_dir)
    }
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, step_dir / MANIFEST)


def check_manifest(step_dir: Path) -> str | None:
    """Why a checkpoint's files are not the ones its manifest lists (None: they are, or it
    has no manifest: written before manifests were kept, and Orbax's reading decides)."""
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not valid JSON"
    for name, want in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size} bytes, {want['size']} when written"
        if _digest(path) != want["sha256"]:
            return f"{name} differs from its checksum"
    return None


def _first_line(e: BaseException) -> str:
    """The error's first line, from the exception at the root of its causes (Orbax wraps
    TensorStore's "OUT_OF_RANGE: ... is not valid for value of size N" in its own)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
    return text[:300]


def read_first_readable(
    directory: Path,
    steps,
    read: Callable[[int], object],
    what: str,
    on_skip=None,
    prefix: str = "",
):
    """(step, read(step)) for the newest of `steps` whose manifest matches and that Orbax
    reads; one warning line on stderr for each newer one skipped (`on_skip(step)` is
    called for it). None of them readable: a UserError naming each and why."""
    failures: list[tuple[int, str]] = []
    for step in sorted(steps, reverse=True):
        reason = check_manifest(directory / str(step))
        if reason is None:
            try:
                value = read(step)
            except Exception as e:  # TensorStore and Orbax raise many kinds for a bad file
                reason = _first_line(e)
        if reason is None:
            for bad, why in failures:
                print(
                    f"warning: checkpoint {directory / str(bad)} is unreadable ({why}); "
                    f"{what} from step {step}, the newest one that reads",
                    file=sys.stderr,
                    flush=True,
                )
                if on_skip is not None:
                    on_skip(bad)
            return step, value
        failures.append((step, reason))
    listed = "; ".join(f"{directory / str(s)}: {why}" for s, why in failures)
    raise UserError(f"{prefix}no checkpoint in {directory} can be read ({listed})")


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _host_copy(tree):
    """NumPy copies of replicated arrays, from this process's own devices. In a
    multi-process run Orbax takes these from process 0 alone (it refuses process-local
    jax.Arrays there), so no other process needs to reach the checkpoint's filesystem."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class Checkpoints:
    """`<run>/checkpoints/<step>/{params,opt_state,meta}`, keeping the last `keep`."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.directory = RunDir(run_dir).checkpoints.absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)
        if jax.process_count() > 1:  # only process 0 saves; no barrier with the others
            options.multiprocessing_options = ocp.options.MultiprocessingOptions(
                primary_host=0, active_processes={0}
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict) -> Path:
        """`opt_state` None writes no optimizer state (an imported run: weights only)."""
        if jax.process_count() > 1:
            params, opt_state = _host_copy((params, opt_state))
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        # Callers hand the directory to others (Ray copies it), so it must be complete.
        self.manager.wait_until_finished()
        write_manifest(self.directory / str(step))
        return self.directory / str(step)

    def restore_latest(self, params, opt_state):
        """(step, params, opt_state, meta) of the newest checkpoint that reads, None
        without any. A newer one that does not read is moved aside (`STEP.unreadable`),
        so that the resumed run writes that step again."""
        steps = self.all_steps()
        if not steps:
            return None
        step, (params, opt_state, meta) = read_first_readable(
            self.directory,
            steps,
            lambda s: self.restore(s, params, opt_state),
            "resuming",
            on_skip=self._move_aside,
        )
        return step, params, opt_state, meta

    def _move_aside(self, step: int) -> None:
        run = RunDir(self.directory.parent)
        target = run.unreadable_checkpoint(step)
        if target.exists():
            shutil.rmtree(target)
        os.replace(run.checkpoint(step), target)
        self.manager.reload()

    def restore(self, step: int, params, opt_state):
        """(params, opt_state, meta) with the structure and shapes of the given trees."""
        if jax.process_count() > 1:  # numpy here; the caller hands the values to the others
            target = _host_copy((params, opt_state))
        else:
            target = _abstract((params, opt_state))
        r = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target[0]),
                opt_state=ocp.args.StandardRestore(target[1]),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return r.params, r.opt_state, r.meta

    def close(self) -> None:
        self.manager.close()


def read_run_info(run_dir: str | Path) -> dict:
    """A run directory's run.json (status, step, BOS id, ...); {} where there is none."""
    return RunDir(run_dir).info()


def load_params(run_dir: str | Path, params, key: str = "train.init_from"):
    """The latest params of another run, shaped like `params` (a new config may change
    seq_len, window, chunk or learning rates, not the weight shapes)."""
    directory = RunDir(run_dir).checkpoints.absolute()
    if not directory.is_dir():
        raise UserError(f"{key}={str(run_dir)!r}: no checkpoints/ directory there")
    manager = ocp.CheckpointManager(directory)
    target = _abstract(params)

    def read(step: int):
        return manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        ).params

    try:
        steps = list(manager.all_steps())
        if not steps:
            raise UserError(f"{key}={str(run_dir)!r}: holds no finished checkpoint")
        step, params = read_first_readable(
            directory, steps, read, "reading weights", prefix=f"{key}={str(run_dir)!r}: "
        )
    finally:
        manager.close()
    return params, step
