"""Joining several JAX processes into one run (one process per host, or per GPU group).

Each process calls `initialize` before any JAX computation, then runs the same
`ttt.train.run`: the mesh spans every process's devices, each process feeds its rows of
the global batch, process 0 writes the files, and checkpoints are saved collectively.
"""

from __future__ import annotations

import jax

from ttt import process
from ttt.errors import UserError


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UserError(
            f"--process-id={process_id}: must be in [0, --num-processes={num_processes})"
        )
    if ":" not in coordinator:
        raise UserError(f"--coordinator={coordinator!r}: expected HOST:PORT")
    # CPU processes need a collectives backend of their own; GPUs use NCCL regardless.
    process.jax_option("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
