"""Before a run: its device memory per replica (`memory`) and its time on a named
accelerator (`speed`), from the config alone. `sweeps.cost` prices a sweep with them."""

from ttt.estimate.memory import Memory, micro_batch, train_memory
from ttt.estimate.speed import ACCELERATORS, JAX_MEM_FRACTION, MEASURED, GiB, Rate, rate

__all__ = [
    "ACCELERATORS",
    "GiB",
    "JAX_MEM_FRACTION",
    "MEASURED",
    "Memory",
    "Rate",
    "micro_batch",
    "rate",
    "train_memory",
]
