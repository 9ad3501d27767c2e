"""TTT-KVB (the paper's Table 1 and Fig 1): sliding-window attention and, beside it in the
same block, fast weights trained at test time on a layer-local key-value binding loss
(LaCT's layout: Zhang et al. 2025, "Test-Time Training Done Right"; docs/ladder.md).

Per head h, with the attention's own projections (q and k QK-normed, before RoPE):

    k' = l2(silu(k)),  q' = l2(silu(q)),  v' = silu(v)              # (T, H, D)
    g(x; W) = W2 (silu(W1 x) * W3 x)                                  # a SwiGLU per head
    chunk i:  z_t = g(q'_t; W_{i-1})          (`kvb_output: key`: g(k'_t; W_{i-1}))
              W_i = renorm(W_{i-1} - grad_W sum_t lr_t l(g(k'_t; W), v'_t))
    l = ||g(k') - v'||^2  (`kvb_loss: mse`, the paper's)   or  -<g(k'), v'>  (`dot`, LaCT's)

`lr_t = softplus(x_t w_lr + softplus^-1(kvb_lr))` per token and head (LaCT's
parameterisation, one LR per head). `renorm` scales each row of every updated weight
back to the norm it had in W_0 (LaCT's channel-wise norm, which keeps repeated updates
from growing the weights). A chunk's outputs read the weights from *before* its own
update, so a token never sees itself through the fast weights; it sees its own chunk
through the attention. The block's output is `wo(attention + RMSNorm(z))`, per head.

The initial weights W_0 and every projection are slow weights; the outer loss (next-token
prediction) differentiates through the updates, so TTT-KVB is meta-learned too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.config import ModelConfig
from ttt.model.layers import Attention, InitialFast, RMSNorm, head_swiglu
from ttt.shapes import kvb_dims

FAST = ("w1", "w2", "w3")


@jax.tree_util.register_dataclass
@dataclass
class FastState:
    """What a KVB layer carries besides its KV cache: the fast weights as trained so far
    (`w`: w1, w3 (..., H, D, f), w2 (..., H, f, D)), and the current chunk's inputs to
    the next update, filled one token at a time while decoding: k', v' (..., chunk, H, D)
    and lr (..., chunk, H)."""

    w: dict
    k: jax.Array
    v: jax.Array
    lr: jax.Array


def _l2(x):
    ft = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(ft)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, -1, keepdims=True) + 1e-12)).astype(x.dtype)


def row_norms(w: dict) -> dict:
    """Each weight's row norms over its input axis (-2), the norms `renorm` restores."""
    return {n: jnp.sqrt(jnp.sum(jnp.square(a), axis=-2, keepdims=True)) for n, a in w.items()}


def binding_loss(w: dict, k, v, lr, loss: str):
    """sum over tokens and heads of lr_t * l(g(k_t; W), v_t). k, v: (..., b, H, D);
    lr: (..., b, H)."""
    pred = head_swiglu(w, k).astype(lr.dtype)
    v = v.astype(lr.dtype)
    per = jnp.sum(jnp.square(pred - v), -1) if loss == "mse" else -jnp.sum(pred * v, -1)
    return jnp.sum(lr * per)


def kvb_update(w: dict, k, v, lr, norms: dict, loss: str) -> dict:
    """One chunk's update: a gradient step on the binding loss, each row then scaled
    back to its norm in W_0 (`norms`). `w`'s leading dims are the sequences': the loss
    is summed over them, so each sequence's weights get their own gradient."""
    g = jax.grad(binding_loss)(w, k, v, lr, loss)
    out = {}
    for n in w:
        step = w[n] - g[n].astype(w[n].dtype)
        scale = jax.lax.rsqrt(jnp.sum(jnp.square(step), axis=-2, keepdims=True) + 1e-12)
        out[n] = step * scale * norms[n]
    return out


def kvb_chunked(w: dict, q, k, v, lr, chunk: int, loss: str, output: str, norms: dict):
    """The fast branch over whole sequences, chunk by chunk. q, k, v: (..., T, H, D); lr:
    (..., T, H); `w` without the leading dims (the initial weights) or with them. Returns
    z (..., T, H, D) and the weights after the last chunk. T is padded to whole chunks;
    padded tokens have zero LR, so they change nothing."""
    lead, seq_len = q.shape[:-3], q.shape[-3]
    n = -(-seq_len // chunk)
    pad = n * chunk - seq_len

    def chunks(x, axis):  # (..., T, rest) -> (n, ..., chunk, rest)
        x = jnp.pad(x, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (x.ndim - axis - 1))
        x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    at = len(lead)
    xs = (chunks(q, at), chunks(k, at), chunks(v, at), chunks(lr, at))
    w = {n_: jnp.broadcast_to(a, (*lead, *a.shape[-3:])) for n_, a in w.items()}

    def step(w, xs):
        qc, kc, vc, lrc = xs
        z = head_swiglu(w, kc if output == "key" else qc)
        return kvb_update(w, kc, vc, lrc, norms, loss), z

    w, z = jax.lax.scan(step, w, xs)
    z = jnp.moveaxis(z, 0, at).reshape(*lead, n * chunk, *q.shape[-2:])
    return z[..., :seq_len, :, :], w


def kvb_step(state: FastState, q, k, v, lr, t, chunk: int, loss: str, output: str, norms):
    """Decoding position t (q, k, v: (..., 1, H, D); lr (..., 1, H)): its output from the
    current weights, then its inputs into the chunk buffer, and, when that completes
    the chunk, the chunk's update. The same weights as `kvb_chunked` at every position."""
    z = head_swiglu(state.w, k if output == "key" else q)
    i = t % chunk
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), i, -3)  # noqa: E731
    kb, vb = put(state.k, k), put(state.v, v)
    lrb = jax.lax.dynamic_update_slice_in_dim(state.lr, lr.astype(state.lr.dtype), i, -2)
    w = jax.lax.cond(
        i == chunk - 1,
        lambda: kvb_update(state.w, kb, vb, lrb, norms, loss),
        lambda: state.w,
    )
    return z, FastState(w, kb, vb, lrb)


def _inv_softplus(x: float) -> float:

    return x + math.log(-math.expm1(-x))


class KVBAttention(Attention):
    """Attention with a TTT-KVB fast branch (module docstring). Same call as `Attention`;
    `cache` is `((k, v, k_pos), FastState)` while decoding, and the second output is
    `((k, v), FastState)`: this call's keys and values, and the fast state after it."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype, rngs)
        h, hd, f = kvb_dims(cfg)
        self.chunk, self.loss, self.out_rule = cfg.kvb_chunk, cfg.kvb_loss, cfg.kvb_output
        self.lr_bias = _inv_softplus(cfg.kvb_lr)
        # LaCT's initialisation: N(0, 1/fan_in)
        init = lambda shape, fan: jax.random.normal(rngs.params(), shape, dtype) * fan**-0.5  # noqa: E731
        self.w1 = InitialFast(init((h, hd, f), hd))
        self.w3 = InitialFast(init((h, hd, f), hd))
        self.w2 = InitialFast(init((h, f, hd), f))
        self.w_lr = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.width, h), dtype))
        self.fast_norm = RMSNorm(hd, dtype)  # per head

    def initial(self) -> dict:
        return {n: getattr(self, n)[...] for n in FAST}

    def empty(self, lead: tuple[int, ...], dtype) -> FastState:
        """The state before any token: W_0 and an empty chunk buffer, for `lead`
        sequences (and, on stacked blocks, every layer)."""
        w0 = self.initial()
        w = {n: jnp.broadcast_to(a, (*lead, *a.shape)) for n, a in w0.items()}
        *layers, h, hd, _ = w0["w1"].shape  # a stacked module has a layer axis in front
        zeros = jnp.zeros((*lead, *layers, self.chunk, h, hd), dtype)
        return FastState(w, zeros, zeros, jnp.zeros(zeros.shape[:-1], jnp.float32))

    def __call__(self, x, positions, window, kernel="dense", cache=None):
        q, k, v = self.qkv(x)
        a, kv = self.attend(q, k, v, positions, window, kernel, None if cache is None else cache[0])
        fq, fk, fv = _l2(jax.nn.silu(q)), _l2(jax.nn.silu(k)), jax.nn.silu(v)
        ft = jnp.promote_types(x.dtype, jnp.float32)
        lr = jax.nn.softplus((x @ self.w_lr[...].astype(x.dtype)).astype(ft) + self.lr_bias)
        w0 = self.initial()
        norms = row_norms(w0)
        how = (self.chunk, self.loss, self.out_rule, norms)
        if cache is None:  # the weights after the last chunk, and an empty buffer
            z, w = kvb_chunked(w0, fq, fk, fv, lr, *how)
            state = dataclasses.replace(self.empty(x.shape[:-2], x.dtype), w=w)
        else:
            z, state = kvb_step(cache[1], fq, fk, fv, lr, positions[0], *how)
        return self.output(a + self.fast_norm(z.astype(a.dtype))), (kv, state)
