"""Device memory of one replica for one training step, from the config alone.

One replica (one device of a data-parallel trial) holds, at its micro-batch of
`data.batch_size / (devices x train.grad_accum)` sequences:

- **state**: the weights, AdamW's two moments and the gradient, in the parameter dtype
  (fp32), and a second gradient (the accumulator) when `train.grad_accum` > 1;
- **activations**: what the backward pass keeps of the blocks that run over whole
  sequences (every block, or `ttt_e2e`'s prefix) under `model.remat`; the backward of the
  largest block or chunk (about what that block or chunk keeps, recomputed beside it under
  `model.remat: inner`); the logits of one block of positions (`loop.hidden_nll`); the
  batch itself;
- **inner**: `ttt_e2e` with meta-learning. The outer gradient goes through every inner
  step, so for each chunk it keeps the chunk's forward *and* its first-order backward, the
  fast weights, their gradient and the KV window (second order). Under `model.remat:
  inner` only the carried state (fast weights, KV window) stays per chunk, and one chunk
  at a time is recomputed; under `block` each suffix layer's forward is recomputed.

How many arrays of each width are kept (`BLOCK`, `SECOND`, ...) was read off XLA's buffer
assignment of the CPU train step at pico and nano, in fp32. `tests/test_estimate.py`
holds the totals to XLA's memory analysis at pico, nano and micro, and BENCHMARKS.md
records the agreement. Activations count in the compute dtype (bf16 on a GPU), scores in
fp32 (`layers.attend` scores in fp32), parameters in theirs. The CPU cannot check the
bf16 case: XLA's CPU backend computes bf16 in fp32 and keeps as much memory. On a GPU,
whole-sequence attention is cuDNN's fused kernel (`model.attention: auto`), which keeps no
score matrix; the inner loop's chunks stay dense in training (`ttt.model.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from ttt.config import Config
from ttt.model.kernels import resolve
from ttt.model.layers import banded_pays
from ttt.model.loop import LOGITS_BLOCK, cache_plan
from ttt.model.recurrent import CHUNK as RECURRENT_CHUNK
from ttt.model.transformer import attention_window, compute_dtype, full_layers, split_layers
from ttt.shapes import RECURRENT, kvb_dims, mamba_dims, mixer_params, model_params, prime_params
from ttt.train.step import uses_inner_loop

F32 = 4


@dataclass(frozen=True)
class Kept:
    """Arrays kept for the backward pass per token: `d` of the model's width and `m` of
    the MLP's (compute dtype); per (query, key) and head `scores` (fp32) and `masks`
    (bytes; per (query, key) alone for a whole-sequence layer, whose mask heads share)."""

    d: float
    m: float
    scores: float = 0.0
    masks: float = 0.0


# A block: per unit of its mixer's projection width, 3 arrays for attention (q, k, v, o
# are 4d wide, so 12 d) and 6 for a recurrent layer's chunked form (the convolution's
# input and output, gates, decays); 6 d of norms and residuals around the MLP, 6 m inside
# it; the scores twice (scores, probabilities) and the mask, or a recurrent layer's
# (chunk x chunk) matrices five times.
PER_MIXER_WIDTH = {"attention": 3, "recurrent": 6}
BLOCK = Kept(d=6, m=6, scores=2, masks=1)
RECURRENT_MATRICES = 5
PRIME = Kept(d=6, m=6)  # a prime MLP trained as a plain layer (`ttt.meta: false`)
# One inner step under the outer gradient, per suffix layer and chunk token: the chunk's
# forward and first-order backward through both MLPs; eight score-sized arrays and two
# masks per head; four copies of the keys and values it attends over; per chunk, four of
# the fast weights (before the step, the gradient, the clipped gradient, its cotangent).
SECOND = Kept(d=64, m=35, scores=8, masks=2)
SECOND_KV, SECOND_FAST = 4, 4
# The same under model.remat: block, which recomputes each suffix layer's forward.
SECOND_BLOCK = Kept(d=23, m=12, scores=2, masks=2)
SECOND_BLOCK_KV = 2
# ttt_kvb's fast heads are trained inside the layer and the outer gradient goes through
# their updates as through TTT-E2E's: counted like one inner step's (per head's hidden
# unit, and four copies of the fast weights per chunk).
KVB_HIDDEN, KVB_FAST = SECOND.m, SECOND_FAST
LOGITS_LIVE = 4  # a block of logits, its softmax, their gradient and the loss's own


@dataclass(frozen=True)
class Memory:
    """Bytes per replica of one training step."""

    weights: float
    optimizer: float
    gradients: float
    activations: float
    inner: float

    @property
    def state(self) -> float:
        return self.weights + self.optimizer + self.gradients

    @property
    def total(self) -> float:
        return self.state + self.activations + self.inner


def micro_batch(cfg: Config, devices: int = 1) -> int:
    """Sequences per replica per micro-step (a sweep checks that this divides)."""
    return max(1, cfg.data.batch_size // (devices * cfg.train.grad_accum))


def train_memory(cfg: Config, devices: int = 1, backend: str = "gpu") -> Memory:
    """One replica's memory for a training step of `cfg` over `devices` data-parallel
    replicas on `backend`: `gpu` (bf16 and fused attention where the config's `auto`
    choices pick them) or `cpu` (what the tests compare with XLA)."""
    m = cfg.model
    params = model_params(m)
    pb = jnp.dtype(m.param_dtype).itemsize
    seq = _Sequence(cfg, backend)
    batch = micro_batch(cfg, devices)
    inner = uses_inner_loop(cfg, training=True)
    n_prefix = split_layers(m)[0]
    whole = n_prefix if inner else m.layers  # the blocks that run over whole sequences
    blocks = [seq.block(i, prime=i >= n_prefix) for i in range(whole)]
    # Remat recomputes the whole-sequence blocks from their inputs: any remat for a plain
    # model, only `block` for ttt_e2e's prefix (`inner` remats the chunk step alone).
    remat = m.remat == "block" or (m.remat == "inner" and not inner)
    kept = whole * seq.tokens(1, 0) if remat else sum(blocks)
    chunk = seq.chunk() * (2 if m.remat == "inner" else 1) if inner else 0.0
    working = batch * max(max(blocks, default=0.0), chunk)
    logits = batch * LOGITS_LIVE * seq.t * m.vocab_size / seq.logit_blocks(batch) * F32
    # the whole batch arrives as arguments: inputs and targets (int32), the mask (bool)
    batch_args = cfg.data.batch_size // devices * seq.t * (2 * 4 + 1)
    return Memory(
        weights=params * pb,
        optimizer=2 * params * pb,
        gradients=params * pb * (2 if cfg.train.grad_accum > 1 else 1),
        activations=batch * kept + working + (0.0 if inner else logits) + batch_args,
        inner=batch * seq.inner_loop() if inner else 0.0,
    )


class _Sequence:
    """Bytes that one sequence of `cfg` keeps, piece by piece."""

    def __init__(self, cfg: Config, backend: str):
        self.cfg, self.m, self.t = cfg, cfg.model, cfg.data.seq_len
        self.act = jnp.dtype(compute_dtype(cfg.model, backend)).itemsize
        self.pb = jnp.dtype(cfg.model.param_dtype).itemsize
        self.kernel = resolve(cfg, first_order=False, backend=backend).sequence

    def tokens(self, d: float, mlp: float, n: int | None = None) -> float:
        """`d` arrays of the model's width and `mlp` of the MLP's, over `n` tokens (T)."""
        return (n or self.t) * (d * self.m.width + mlp * self.m.mlp) * self.act

    def block(self, layer: int, prime: bool) -> float:
        """What block `layer` keeps over the whole sequence without remat."""
        m = self.m
        recurrent = m.mixer in RECURRENT
        width = mixer_params(m) / m.width if recurrent else 4 * m.width
        d = PER_MIXER_WIDTH["recurrent" if recurrent else "attention"] * width / m.width
        out = self.tokens(d + BLOCK.d + PRIME.d * prime, BLOCK.m + PRIME.m * prime)
        heads, keys = self._scored(layer)
        if recurrent:
            out += self.t * keys * heads * RECURRENT_MATRICES * F32
        else:
            out += self.t * keys * (heads * BLOCK.scores * F32 + BLOCK.masks)
        if m.mixer == "ttt_kvb":
            h, hd, f = kvb_dims(m)
            out += -(-self.t // m.kvb_chunk) * KVB_FAST * 3 * h * hd * f * self.pb
            out += self.t * h * f * KVB_HIDDEN * self.act
        return out

    def _scored(self, layer: int) -> tuple[float, float]:
        """(heads, keys per query) of the score-like matrices of one layer."""
        m = self.m
        if m.mixer == "gated_deltanet":
            return m.heads, RECURRENT_CHUNK  # each chunk's (C x C) matrices
        if m.mixer == "mamba2":
            return mamba_dims(m)[1], RECURRENT_CHUNK
        if self.kernel != "dense":
            return 0.0, 0.0  # a fused kernel never builds the score matrix
        keys = _keys(self.t, attention_window(m))
        if full_layers(m) is not None:  # each hybrid layer compiles both spans (lax.cond)
            keys += self.t
        return m.heads, keys

    def logit_blocks(self, batch: int) -> int:
        """How many blocks `loop.hidden_nll` cuts a whole sequence's positions into."""
        need = -(-batch * self.t * self.m.vocab_size // LOGITS_BLOCK)
        return next(n for n in range(max(need, 1), self.t + 1) if self.t % n == 0)

    def _fast(self) -> float:
        """The inner loop's weights (W1, W2, W3 of every suffix layer's prime MLP)."""
        return self.m.ttt_layers * (prime_params(self.m) - 2 * self.m.width) * self.pb

    def _chunk(self, kept: Kept, kv: int, keys: int, fast: int) -> float:
        """What one chunk's second order keeps: per suffix layer `kept` over its tokens,
        `kv` copies of the `keys` it attends over; `fast` copies of the fast weights; the
        chunk's logits."""
        m, b = self.m, self.cfg.ttt.chunk
        layer = self.tokens(kept.d, kept.m, b)
        layer += b * keys * m.heads * (kept.scores * F32 + kept.masks)
        layer += kv * keys * m.width * self.act
        return m.ttt_layers * layer + fast * self._fast() + b * m.vocab_size * F32

    def chunk(self) -> float:
        """The last chunk's whole second-order state, which its backward (or its
        recomputation under `model.remat: inner`) holds at once."""
        b = self.cfg.ttt.chunk
        return self._chunk(SECOND, SECOND_KV, min(self.m.window, self.t - b) + b, SECOND_FAST)

    def inner_loop(self) -> float:
        """What the outer gradient keeps of the chunk loop, over every chunk."""
        cfg, m, b = self.cfg, self.m, self.cfg.ttt.chunk
        runs = cache_plan(self.t // b, b, min(m.window, self.t - b), cfg.ttt.cache_phases)
        total = 0.0
        for count, cache in runs:
            window = 2 * m.ttt_layers * cache * m.width * self.act  # the carried k and v
            if m.remat == "inner":  # the carry alone: fast weights and KV window
                per_chunk = self._fast() + window
            elif m.remat == "block":
                per_chunk = self._chunk(SECOND_BLOCK, SECOND_BLOCK_KV, cache + b, SECOND_FAST)
                per_chunk += window
            else:
                per_chunk = self._chunk(SECOND, SECOND_KV, cache + b, SECOND_FAST)
            total += count * per_chunk
        return total + LOGITS_LIVE * b * m.vocab_size * F32  # one chunk's logits at a time


def _keys(seq_len: int, window: int | None) -> float:
    """Keys per query in the dense score matrix of whole-sequence attention: blocks of 2k
    keys where they pay (`layers.banded_pays`), else all T."""
    return 2 * window if banded_pays(seq_len, window) else seq_len
