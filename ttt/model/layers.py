"""Blocks of the TTT-E2E Transformer (docs/design.md, "The model's math").

Every sublayer is `x = x + PostNorm(F(PreNorm(x)))`. Parameters live in `param_dtype`
and are cast to the compute dtype where they are used, so the inner loop updates
fp32 weights even when the matmuls run in bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.config import ModelConfig

ROPE_THETA = 500_000.0
NORM_EPS = 1e-6
INIT_STD = 0.02


class FastParam(nnx.Param):
    """A weight the inner loop trains at test time (W1, W2, W3 of a prime MLP)."""


class InitialFast(nnx.Param):
    """ttt_kvb: a fast weight's initial value. Slow (the outer loop learns it); each
    sequence starts from a copy that its layer trains at test time (`ttt.model.kvb`)."""


def _at_least_f32(dtype):
    """fp32 for bf16/fp32 compute, fp64 when a test runs the model in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    return INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the compute dtype: bf16 variance loses the scale.
        xf = x.astype(_at_least_f32(x.dtype))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + NORM_EPS)
        return (y * self.scale[...].astype(y.dtype)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... by position * theta^(-2i/d).

    x: (..., T, H, D); positions: (T,). Pairs are interleaved, not split in halves:
    the other convention silently costs about 2 nats on the reference checkpoints.
    """
    d, ft = x.shape[-1], _at_least_f32(x.dtype)
    inv_freq = ROPE_THETA ** (-jnp.arange(0, d, 2, dtype=ft) / d)
    angle = positions.astype(ft)[:, None] * inv_freq  # (T, D/2)
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]  # (T, 1, D/2)
    pairs = x.astype(ft).reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """Query i sees key j iff j <= i, j > i - window, and j is a real token (j >= 0).
    q_pos: (..., T), k_pos: (..., S) -> (..., T, S)."""
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    return mask


def attend(q, k, v, q_pos, k_pos, window: int | None) -> jax.Array:
    """Masked softmax attention. q: (..., T, H, D); k, v: (..., S, H, D); positions (T,)
    and (S,), or with leading dims that broadcast against q's."""
    scale, ft = q.shape[-1] ** -0.5, _at_least_f32(q.dtype)
    scores = jnp.einsum("...thd,...shd->...hts", q, k, preferred_element_type=ft)
    mask = window_mask(q_pos, k_pos, window)[..., None, :, :]  # one mask for every head
    scores = jnp.where(mask, scores * scale, jnp.finfo(ft).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("...hts,...shd->...thd", probs, v)


def banded_pays(seq_len: int, window: int | None) -> bool:
    """Whether window-sized blocks (`attend_banded`) score fewer (query, key) pairs than
    the whole (T x T) matrix: a window under about half the sequence."""
    if window is None:
        return False
    return 2 * window * window * -(-seq_len // window) < seq_len * seq_len


def attend_banded(q, k, v, window: int) -> jax.Array:
    """Sliding-window self-attention of a whole sequence (positions 0..T-1) in blocks of
    `window` queries, each over its own block's keys and the previous block's: T x 2k
    scores instead of T x T, and the same function (query i sees i - k < j <= i, which
    lies within those two blocks). Pure jnp, so it can be differentiated twice.
    q, k, v: (..., T, H, D); T is padded up to a multiple of the window."""
    seq_len = q.shape[-3]
    n = -(-seq_len // window)

    def blocks(x):  # (..., T, H, D) -> (..., n, window, H, D)
        pad = [(0, 0)] * (x.ndim - 3) + [(0, n * window - seq_len), (0, 0), (0, 0)]
        x = jnp.pad(x, pad)
        return x.reshape(*x.shape[:-3], n, window, *x.shape[-2:])

    def with_previous(x):  # block j's keys: block j-1 (zeros before block 0), then j
        prev = jnp.concatenate([jnp.zeros_like(x[..., :1, :, :, :]), x[..., :-1, :, :, :]], -4)
        return jnp.concatenate([prev, x], axis=-3)

    pos = jnp.arange(n * window).reshape(n, window)
    k_pos = jnp.concatenate([pos - window, pos], axis=-1)  # block 0's "previous" is < 0
    kb, vb = with_previous(blocks(k)), with_previous(blocks(v))
    out = attend(blocks(q), kb, vb, pos, k_pos, window)
    return out.reshape(*q.shape[:-3], n * window, *q.shape[-2:])[..., :seq_len, :, :]


def _fused(q, k, v, kernel: str, **how) -> jax.Array:
    """jax's fused attention on (..., T, H, D) inputs of any number of leading dims."""
    flat = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), implementation=kernel, **how)
    return out.reshape(q.shape)


def attend_sequence(q, k, v, window: int | None, kernel: str) -> jax.Array:
    """Causal (window None) or sliding-window self-attention of a whole sequence.
    q, k, v: (..., T, H, D), positions 0..T-1. `dense` scores a window well under the
    sequence in window-sized blocks; the fused kernels get the whole mask."""
    if kernel == "dense":
        if banded_pays(q.shape[-3], window):
            return attend_banded(q, k, v, window)
        pos = jnp.arange(q.shape[-3])
        return attend(q, k, v, pos, pos, window)
    # (left, right): key j is seen iff i - left <= j <= i + right, so j > i - window.
    local = None if window is None else (window - 1, 0)
    return _fused(q, k, v, kernel, is_causal=True, local_window_size=local)


def attend_cached(q, k, v, q_pos, k_pos, window: int | None, kernel: str) -> jax.Array:
    """A chunk's queries over its KV cache followed by its own keys, at any positions
    (empty cache slots sit at negative ones). The fused kernels get the explicit mask:
    their built-in causal mask aligns the first query with the first key, whereas here
    the queries line up with the last keys."""
    if kernel == "dense":
        return attend(q, k, v, q_pos, k_pos, window)
    # One mask per head: under vmap, jax 0.11's batching rule for the cuDNN call reshapes
    # the mask to (batch, heads, T, S) and cannot take a mask shared across heads.
    mask = window_mask(q_pos, k_pos, window)
    mask = jnp.broadcast_to(mask, (1, q.shape[-2], *mask.shape))
    return _fused(q, k, v, kernel, mask=mask)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, h = cfg.width, cfg.heads
        self.heads, self.head_dim = h, d // h
        self.wq = nnx.Param(_normal(rngs, (d, d), dtype))
        self.wk = nnx.Param(_normal(rngs, (d, d), dtype))
        self.wv = nnx.Param(_normal(rngs, (d, d), dtype))
        self.wo = nnx.Param(_normal(rngs, (d, d), dtype))
        self.q_norm = RMSNorm(self.head_dim, dtype)
        self.k_norm = RMSNorm(self.head_dim, dtype)

    def __call__(self, x, positions, window: int | None, kernel: str = "dense", cache=None):
        """x: (..., T, d). cache: (k, v, k_pos) of earlier tokens, or None. `kernel`
        (dense, xla or cudnn; `ttt.model.kernels`) is this call's attention kernel.

        Returns the output and this call's own (k, v), already normed and rotated, so a
        caller can carry them into the next chunk's cache.
        """
        out, kv = self.attend(*self.qkv(x), positions, window, kernel, cache)
        return self.output(out), kv

    def qkv(self, x):
        """Per head (..., T, H, D): q and k normed (before RoPE), and v."""
        dt = x.dtype
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)  # noqa: E731
        q = split(x @ self.wq[...].astype(dt))
        k = split(x @ self.wk[...].astype(dt))
        v = split(x @ self.wv[...].astype(dt))
        return self.q_norm(q), self.k_norm(k), v

    def output(self, out):
        """(..., T, H, D) -> (..., T, d) through the output projection."""
        return out.reshape(*out.shape[:-2], -1) @ self.wo[...].astype(out.dtype)

    @staticmethod
    def attend(q, k, v, positions, window, kernel, cache):
        """RoPE, then attention over the sequence or over `cache` and the new keys:
        (..., T, H, D) per head, and this call's rotated (k, v)."""
        q, k = rope(q, positions), rope(k, positions)
        if cache is None:  # the whole sequence at positions 0..T-1
            out = attend_sequence(q, k, v, window, kernel)
        else:
            ck, cv, cpos = cache
            k_all = jnp.concatenate([ck, k], axis=-3)
            v_all = jnp.concatenate([cv, v], axis=-3)
            k_pos = jnp.concatenate([cpos, positions])
            out = attend_cached(q, k_all, v_all, positions, k_pos, window, kernel)
        return out, (k, v)


class MLP(nnx.Module):
    """SwiGLU: W2(silu(W1 x) * W3 x)."""

    def __init__(self, d: int, hidden: int, dtype, rngs: nnx.Rngs, param=nnx.Param):
        self.w1 = param(_normal(rngs, (d, hidden), dtype))
        self.w3 = param(_normal(rngs, (d, hidden), dtype))
        self.w2 = param(_normal(rngs, (hidden, d), dtype))

    def __call__(self, x):
        dt = x.dtype
        gate = jax.nn.silu(x @ self.w1[...].astype(dt))
        return (gate * (x @ self.w3[...].astype(dt))) @ self.w2[...].astype(dt)


def head_swiglu(w: dict, x: jax.Array) -> jax.Array:
    """A SwiGLU per head: w2(silu(w1 x) * w3 x). x: (..., T, H, D); w1, w3: (..., H, D, f);
    w2: (..., H, f, D), leading dims broadcasting against x's."""
    dt = x.dtype
    up = lambda name: jnp.einsum("...thd,...hdf->...thf", x, w[name].astype(dt))  # noqa: E731
    return jnp.einsum("...thf,...hfd->...thd", jax.nn.silu(up("w1")) * up("w3"), w["w2"].astype(dt))


class HeadMLP(nnx.Module):
    """A prime MLP split into `heads` heads: each slice of width/heads channels has its own
    SwiGLU (width/heads -> hidden/heads -> width/heads). One head is `MLP` itself."""

    def __init__(self, d: int, hidden: int, heads: int, dtype, rngs: nnx.Rngs, param=nnx.Param):
        hd, f = d // heads, hidden // heads
        self.heads = heads
        self.w1 = param(_normal(rngs, (heads, hd, f), dtype))
        self.w3 = param(_normal(rngs, (heads, hd, f), dtype))
        self.w2 = param(_normal(rngs, (heads, f, hd), dtype))

    def __call__(self, x):
        xh = x.reshape(*x.shape[:-1], self.heads, -1)
        w = {"w1": self.w1[...], "w2": self.w2[...], "w3": self.w3[...]}
        return head_swiglu(w, xh).reshape(x.shape)
