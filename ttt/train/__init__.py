"""Training: the jitted step, the run loop with checkpoints, and evaluation."""

from ttt.train.trainer import Diverged, Hook, Reporter, RunResult, Step, Trainer, run

__all__ = ["Diverged", "Hook", "Reporter", "RunResult", "Step", "Trainer", "run"]
