"""Every attention-kernel and remat choice of a step, resolved once from the config where
the step is made (the backend is known there), then passed down as one value.

`model.attention` picks the kernel of whole-sequence attention, `ttt.chunk_attention`
the kernel of the inner loop's chunks on first-order paths (evaluation, prefill; in
training the chunks stay dense, which can be differentiated twice), `model.remat` what
is recomputed in the backward pass. Whether a kernel exists on the backend is checked in
config validation (`ttt.config.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ttt.config import Config
from ttt.model.transformer import compute_dtype


@dataclass(frozen=True)
class Kernels:
    sequence: str = "dense"  # whole sequences: dense | xla | cudnn
    chunk: str = "dense"  # the inner loop's chunks over their KV cache
    remat: str = "none"  # none | block | inner


DENSE = Kernels()


def _pick(choice: str, cfg: Config, backend: str) -> str:
    """`auto` is cuDNN's flash attention where it applies (GPU, bf16/fp16, head_dim a
    multiple of 8 up to 128): it never builds the (T x S) score matrix. Elsewhere dense."""
    if choice != "auto":
        return choice
    dtype = compute_dtype(cfg.model, backend)
    head_dim = cfg.model.width // cfg.model.heads
    fits = dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if backend == "gpu" and fits else "dense"


def resolve(cfg: Config, *, first_order: bool, backend: str | None = None) -> Kernels:
    """The kernels of one step. `first_order`: nothing differentiates through the inner
    updates (evaluation, prefill), so the chunks may use `ttt.chunk_attention`."""
    backend = backend or jax.default_backend()
    return Kernels(
        sequence=_pick(cfg.model.attention, cfg, backend),
        chunk=_pick(cfg.ttt.chunk_attention, cfg, backend) if first_order else "dense",
        remat=cfg.model.remat,
    )
