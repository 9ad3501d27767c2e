"""How long training (or evaluating) takes on a named accelerator, from the config alone.

Time is tokens x FLOPs per token (`ttt.train.flops`, this project's count) over devices x
the accelerator's peak bf16 rate x an MFU. The MFU is this project's own where it has
measured the same row on a GPU (`MEASURED`, from BENCHMARKS.md: none yet), else the
reference implementation's measured H200 throughput (`REFERENCE`, issue 38's table) turned
into an MFU with this project's FLOP count, from the nearest row of the same kind; that
assumes the MFU carries over to the trial's size, context length and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttt.config import Config, load_config
from ttt.shapes import model_params
from ttt.train.flops import PEAK_FLOPS, flops_per_token
from ttt.train.step import uses_inner_loop

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory: float  # bytes
    peak: float  # dense bf16 FLOP/s


ACCELERATORS = {
    key: Accelerator(key.upper(), gib * GiB, PEAK_FLOPS[key])
    for key, gib in (("h100", 80), ("h200", 141), ("a100", 80))
}
# A process with a whole GPU gets this share of its memory from JAX's allocator unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (JAX's documented default).
JAX_MEM_FRACTION = 0.75


@dataclass(frozen=True)
class Measured:
    """A step's throughput on one device, at the shapes of `preset` with `mixer`."""

    preset: str
    mixer: str
    seq_len: int
    batch: int
    tokens_per_s: float
    mode: str  # train | prefill
    device: str = "h200"

    def config(self) -> Config:
        over = {"model.mixer": self.mixer, "data.seq_len": self.seq_len}
        return load_config(self.preset, {**over, "data.batch_size": self.batch})

    def mfu(self) -> float:
        training = self.mode == "train"
        cfg = self.config()
        per_token = flops_per_token(cfg, training=training, inner=uses_inner_loop(cfg, training))
        return self.tokens_per_s * per_token / ACCELERATORS[self.device].peak

    def label(self) -> str:
        return f"{self.preset} {self.mixer} {self.mode} T={self.seq_len // 1024}K B={self.batch}"


# This project's own GPU rows, from BENCHMARKS.md (`python -m ttt.gpu_check`): none yet.
MEASURED: tuple[Measured, ...] = ()
# The reference implementation on one H200 (JAX 0.11, bf16, random tokens), issue 38.
REFERENCE = (
    Measured("125m", "ttt_e2e", 8192, 8, 40.7e3, "train"),
    Measured("125m", "full", 8192, 8, 168.3e3, "train"),
    Measured("125m", "ttt_e2e", 32768, 2, 37.1e3, "train"),
    Measured("125m", "full", 32768, 2, 85.5e3, "train"),
    Measured("760m", "ttt_e2e", 8192, 4, 12.6e3, "train"),
    Measured("760m", "full", 8192, 4, 40.4e3, "train"),
    Measured("125m", "ttt_e2e", 32768, 1, 32768 / 0.218, "prefill"),
    Measured("125m", "full", 32768, 1, 32768 / 0.071, "prefill"),
    Measured("125m", "ttt_e2e", 131072, 1, 131072 / 0.871, "prefill"),
    Measured("125m", "full", 131072, 1, 131072 / 0.810, "prefill"),
)


@dataclass(frozen=True)
class Rate:
    mfu: float
    source: str  # the measurement the MFU comes from

    def seconds(self, cfg: Config, tokens: float, acc: Accelerator, devices: int, training=True):
        inner = uses_inner_loop(cfg, training)
        per_token = flops_per_token(cfg, training=training, inner=inner)
        return tokens * per_token / (devices * acc.peak * self.mfu)


def rate(cfg: Config, training: bool = True) -> Rate:
    """The MFU to price `cfg` at: this project's own measurement of the same row if there
    is one, else the reference's H200 row of the same kind (a step with the inner loop,
    or a plain one, for which full attention's rows stand for every mixer) nearest in
    parameters and context length."""
    mode = "train" if training else "prefill"
    row = (cfg.preset, cfg.model.mixer, cfg.data.seq_len, mode)
    own = [r for r in MEASURED if (r.preset, r.mixer, r.seq_len, r.mode) == row]
    if own:
        return Rate(own[0].mfu(), f"measured {own[0].label()}")
    kind = "ttt_e2e" if uses_inner_loop(cfg, training) else "full"
    params, t = model_params(cfg.model), cfg.data.seq_len

    def distance(r: Measured) -> float:
        size = model_params(r.config().model)
        return abs(math.log(size / params)) + abs(math.log(r.seq_len / t))

    best = min((r for r in REFERENCE if r.mixer == kind and r.mode == mode), key=distance)
    return Rate(best.mfu(), f"reference {best.label()}")
