"""Orbax checkpoints of a run: params, optimizer state, step and data position."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from ttt.errors import UserError


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """`<run>/checkpoints/<step>/{params,opt_state,meta}`, keeping the last `keep`."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> Path:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        # Callers hand the directory to others (Ray copies it), so it must be complete.
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def restore(self, step: int, params, opt_state):
        """(params, opt_state, meta) with the structure and shapes of the given trees."""
        r = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return r.params, r.opt_state, r.meta

    def close(self) -> None:
        self.manager.close()


def load_params(run_dir: str | Path, params, key: str = "train.init_from"):
    """The latest params of another run, shaped like `params` (a new config may change
    seq_len, window, chunk or learning rates, not the weight shapes)."""
    directory = Path(run_dir).expanduser().absolute() / "checkpoints"
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
