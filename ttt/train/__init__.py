"""Training: the jitted step, the run loop with checkpoints, and evaluation."""

from ttt.train.trainer import Reporter, RunResult, run

__all__ = ["Reporter", "RunResult", "run"]
