"""Orbax checkpoints of a run: params, optimizer state, step and data position."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ttt.errors import UserError
from ttt.rundir import RunDir


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
        return self.directory / str(step)

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
    step = manager.latest_step()
    if step is None:
        raise UserError(f"{key}={str(run_dir)!r}: holds no finished checkpoint")
    try:
        r = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params)))
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{key}={str(run_dir)!r}: its weights do not fit this model "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    finally:
        manager.close()
    return r.params, step
