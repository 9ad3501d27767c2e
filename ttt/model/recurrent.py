"""The RNN baselines of Fig 1 as sequence mixers: Gated DeltaNet and Mamba 2.

Each is one module with the signature of `Attention` (`x, positions, window, kernel,
cache -> out, state`), so `Block`, the layer scan, training, evaluation and decoding take
them unchanged. Whole sequences run in the chunked (parallel) form; decoding one token
at a time runs the recurrence on a fixed-size `RecurrentState`, so a step costs the same
at any context length.

- **Gated DeltaNet** (Yang, Kautz and Hatamizadeh, ICLR 2025), in the layout of
  flash-linear-attention's `GatedDeltaNet`: q, k, v projections each through a short
  causal convolution (kernel 4) and SiLU; q and k L2-normalised per head; a decay
  `g = -exp(A_log) * softplus(a_proj x + dt_bias)` and a write strength
  `beta = sigmoid(b_proj x)` per head; key width 0.75 d and value width 1.5 d over the
  model's heads (`expand_k`, `expand_v`); the output RMS-normed per head and gated by
  `silu(g_proj x)`. Per head, with state S (d_k x d_v):

      S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t / sqrt(d_k)

  The chunked form is the WY representation of flash-linear-attention's reference
  (`chunk_gated_delta_rule`): within a chunk, a unit lower-triangular solve replaces
  the token loop, and the state passes from chunk to chunk.
- **Mamba 2** (Dao and Gu 2024), in the layout of state-spaces/mamba's `Mamba2`: one
  input projection to (z, x, B, C, dt); a short causal convolution (kernel 4, with bias)
  and SiLU over (x, B, C); `dt = softplus(dt + dt_bias)`, `A = -exp(A_log)` per head;
  heads of 64 channels, one group of B and C of size `model.ssm_state`; a skip `D`; the
  output `RMSNorm(y * silu(z))`. Per head, with state h (P x N):

      h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t

  The chunked form is the SSD algorithm of `ssd_minimal.py` (intra-chunk as a masked
  matrix, the state across chunks).

Neither uses RoPE: position enters through the recurrence. Padded positions (a sequence
cut into whole chunks) get zero decay and zero write, so they change no state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.config import ModelConfig
from ttt.model.layers import INIT_STD
from ttt.shapes import CONV, gdn_dims, mamba_dims

CHUNK = 64  # tokens per chunk of the parallel form (flash-linear-attention's default)
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # dt's initial range (both authors)
A_RANGE = (1.0, 16.0)  # A's initial range (|A| for Mamba 2; exp(A_log) for GDN)


def _f32(dtype):
    return jnp.promote_types(dtype, jnp.float32)


@jax.tree_util.register_dataclass
@dataclass
class RecurrentState:
    """What a recurrent layer carries from one token to the next: the last `CONV - 1`
    inputs of its convolution (..., CONV - 1, channels) and its state matrix per head."""

    conv: jax.Array
    ssm: jax.Array


# -- the pieces both layers share ------------------------------------------------------


def causal_conv(x, w, b=None, state=None):
    """Depthwise causal convolution along T: y_t = sum_i w[i] * x_{t - (K-1) + i} (+ b).
    x: (..., T, C); w: (K, C); state: (..., K-1, C), the inputs before x (zeros at the
    start). Returns y and the last K-1 inputs (the next call's state)."""
    k = w.shape[0]
    if state is None:
        state = jnp.zeros((*x.shape[:-2], k - 1, x.shape[-1]), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=-2)
    t = x.shape[-2]
    y = sum(xp[..., i : i + t, :] * w[i].astype(x.dtype) for i in range(k))
    if b is not None:
        y = y + b.astype(x.dtype)
    return y, xp[..., t:, :]


def _dt_bias(rngs: nnx.Rngs, n: int, dtype) -> jax.Array:
    """Inverse softplus of dt ~ log-uniform(DT_MIN, DT_MAX): softplus(dt_bias) starts
    there (both authors' init)."""
    u = jax.random.uniform(rngs.params(), (n,), jnp.float32)
    dt = jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = jnp.maximum(dt, DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log(rngs: nnx.Rngs, n: int, dtype) -> jax.Array:
    return jnp.log(jax.random.uniform(rngs.params(), (n,), jnp.float32, *A_RANGE)).astype(dtype)


def _conv_init(rngs: nnx.Rngs, channels: int, dtype) -> jax.Array:
    """PyTorch's default for a depthwise Conv1d (fan-in = kernel): U(-1/2, 1/2)."""
    bound = 1 / math.sqrt(CONV)
    return jax.random.uniform(rngs.params(), (CONV, channels), dtype, -bound, bound)


def _normal(rngs: nnx.Rngs, shape, dtype):

    return INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


def _rms(x, eps=1e-6):
    xf = x.astype(_f32(x.dtype))
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _chunks(x, n: int, chunk: int, axis: int):
    """Pad `axis` (length T) to n * chunk and split it into (n, chunk)."""
    axis %= x.ndim
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * chunk - x.shape[axis])
    x = jnp.pad(x, pad)
    return x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1 :])


def _lower(chunk: int, strict: bool) -> jax.Array:
    return jnp.tril(jnp.ones((chunk, chunk), bool), -1 if strict else 0)


def _decay_matrix(g_cum, strict: bool = False):
    """exp(G_i - G_j) for j <= i (j < i when `strict`), 0 elsewhere; G: (..., C)."""
    mask = _lower(g_cum.shape[-1], strict)
    diff = g_cum[..., :, None] - g_cum[..., None, :]
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


# -- Gated DeltaNet --------------------------------------------------------------------


def unit_lower_inverse(m):
    """The inverse of unit lower-triangular matrices (..., C, C), by halves:
    [[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]. Matrix products only (the
    form a GPU runs fast, differentiable like any matmul); XLA's CPU triangular solve
    stalled on batches of these in a training step."""
    c = m.shape[-1]
    if c == 1:
        return jnp.ones_like(m)
    h = c // 2
    a_inv = unit_lower_inverse(m[..., :h, :h])
    d_inv = unit_lower_inverse(m[..., h:, h:])
    lower_left = -d_inv @ m[..., h:, :h] @ a_inv
    top = jnp.concatenate([a_inv, jnp.zeros((*m.shape[:-2], h, c - h), m.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([lower_left, d_inv], axis=-1)], axis=-2)


def gated_delta_chunked(q, k, v, g, beta, chunk: int = CHUNK, state=None):
    """The gated delta rule over a whole sequence, chunk by chunk.

    q, k: (..., T, H, dk) (q already scaled); v: (..., T, H, dv); g (log decay, <= 0) and
    beta: (..., T, H); state: (..., H, dk, dv) or None. Returns o (..., T, H, dv) and the
    state after the last token."""
    t, dk, dv = q.shape[-3], q.shape[-1], v.shape[-1]
    ft = _f32(q.dtype)
    n = max(1, -(-t // chunk))
    # (..., H, n, C, .): heads in front of the chunks
    heads_first = lambda a: jnp.moveaxis(a, -2, -3) if a.ndim == q.ndim else jnp.moveaxis(a, -1, -2)  # noqa: E731
    q, k, v = (_chunks(heads_first(a.astype(ft)), n, chunk, -2) for a in (q, k, v))
    g, beta = (_chunks(heads_first(a.astype(ft)), n, chunk, -1) for a in (g, beta))
    g_cum = jnp.cumsum(g, axis=-1)  # (..., H, n, C)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    decay = _decay_matrix(g_cum)  # (..., H, n, C, C)
    # T = (I + strictly_lower(k_beta k^T * decay))^-1: the chunk's writes, each after the
    # earlier ones in the chunk, as one solve (the WY representation)
    a = jnp.einsum("...ik,...jk->...ij", k_beta, k) * decay
    inverse = unit_lower_inverse(jnp.eye(chunk, dtype=ft) + jnp.where(_lower(chunk, True), a, 0.0))
    u = inverse @ v_beta  # (..., H, n, C, dv)
    w = inverse @ (k_beta * jnp.exp(g_cum)[..., None])  # (..., H, n, C, dk)
    scores = jnp.einsum("...ik,...jk->...ij", q, k) * decay  # causal, diagonal included
    last = g_cum[..., -1:]  # (..., H, n, 1)
    k_out = k * jnp.exp(last - g_cum)[..., None]  # each key's decay to the chunk's end

    lead = q.shape[:-3]  # (..., H)
    s0 = jnp.zeros((*lead, dk, dv), ft) if state is None else state.astype(ft)

    def step(s, xs):
        q_c, g_c, u_c, w_c, sc, k_c, last_c = xs
        v_new = u_c - w_c @ s
        o = (q_c * jnp.exp(g_c)[..., None]) @ s + sc @ v_new
        s = s * jnp.exp(last_c)[..., None] + jnp.swapaxes(k_c, -1, -2) @ v_new
        return s, o

    per_chunk = lambda a: jnp.moveaxis(a, len(lead), 0)  # noqa: E731  (n, ..., H, ...)
    xs = tuple(per_chunk(a) for a in (q, g_cum, u, w, scores, k_out, last))
    s, o = jax.lax.scan(step, s0, xs)  # o: (n, ..., H, C, dv)
    o = jnp.moveaxis(o, 0, len(lead)).reshape(*lead, n * chunk, dv)[..., :t, :]
    return jnp.moveaxis(o, -3, -2), s  # (..., T, H, dv)


def gated_delta_step(q, k, v, g, beta, state):
    """One token: q, k: (..., H, dk); v: (..., H, dv); g, beta: (..., H); state
    (..., H, dk, dv). Returns o (..., H, dv) and the new state."""
    ft = _f32(q.dtype)
    q, k, v, g, beta = (a.astype(ft) for a in (q, k, v, g, beta))
    s = state.astype(ft) * jnp.exp(g)[..., None, None]
    v_new = beta[..., None] * (v - jnp.einsum("...kv,...k->...v", s, k))
    s = s + k[..., :, None] * v_new[..., None, :]
    return jnp.einsum("...kv,...k->...v", s, q), s


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.heads, self.dk, self.dv = h, dk, dv = gdn_dims(cfg)
        self.wq = nnx.Param(_normal(rngs, (d, h * dk), dtype))
        self.wk = nnx.Param(_normal(rngs, (d, h * dk), dtype))
        self.wv = nnx.Param(_normal(rngs, (d, h * dv), dtype))
        self.wa = nnx.Param(_normal(rngs, (d, h), dtype))  # decay (alpha) gate
        self.wb = nnx.Param(_normal(rngs, (d, h), dtype))  # write strength (beta)
        self.wg = nnx.Param(_normal(rngs, (d, h * dv), dtype))  # output gate
        self.wo = nnx.Param(_normal(rngs, (h * dv, d), dtype))
        self.conv = nnx.Param(_conv_init(rngs, h * (2 * dk + dv), dtype))
        self.a_log = nnx.Param(_a_log(rngs, h, dtype))
        self.dt_bias = nnx.Param(_dt_bias(rngs, h, dtype))
        self.o_norm = nnx.Param(jnp.ones((dv,), dtype))

    def empty(self, lead: tuple[int, ...], dtype) -> RecurrentState:
        h, dk, dv = self.heads, self.dk, self.dv
        return RecurrentState(
            jnp.zeros((*lead, CONV - 1, h * (2 * dk + dv)), dtype),
            jnp.zeros((*lead, h, dk, dv), _f32(dtype)),
        )

    def __call__(self, x, positions, window=None, kernel="dense", cache=None, chunk=CHUNK):
        """x: (..., T, d). cache: the state before x, or None (the start). Returns the
        output and the state after x."""
        dt, h, dk, dv = x.dtype, self.heads, self.dk, self.dv
        p = lambda w: x @ w[...].astype(dt)  # noqa: E731
        qkv = jnp.concatenate([p(self.wq), p(self.wk), p(self.wv)], axis=-1)
        qkv, conv = causal_conv(qkv, self.conv[...], state=None if cache is None else cache.conv)
        qkv = jax.nn.silu(qkv)
        q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
        heads = lambda a, n: a.reshape(*a.shape[:-1], h, n)  # noqa: E731
        l2 = lambda a: a * jax.lax.rsqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
        q = l2(heads(q, dk).astype(_f32(dt))) * dk**-0.5
        k = l2(heads(k, dk).astype(_f32(dt)))
        v = heads(v, dv)
        beta = jax.nn.sigmoid(p(self.wb).astype(_f32(dt)))
        a = p(self.wa).astype(_f32(dt)) + self.dt_bias[...].astype(_f32(dt))
        g = -jnp.exp(self.a_log[...].astype(_f32(dt))) * jax.nn.softplus(a)
        state = None if cache is None else cache.ssm
        if x.shape[-2] == 1 and cache is not None:  # decoding: the recurrence itself
            o, s = gated_delta_step(q[..., 0, :, :], k[..., 0, :, :], v[..., 0, :, :],
                                    g[..., 0, :], beta[..., 0, :], state)  # fmt: skip
            o = o[..., None, :, :]
        else:
            o, s = gated_delta_chunked(q, k, v, g, beta, chunk, state)
        o = _rms(o) * self.o_norm[...].astype(o.dtype)  # per head
        o = o * jax.nn.silu(heads(p(self.wg), dv).astype(o.dtype))
        out = o.astype(dt).reshape(*o.shape[:-2], h * dv) @ self.wo[...].astype(dt)
        return out, RecurrentState(conv, s)


# -- Mamba 2 ---------------------------------------------------------------------------


def ssd_chunked(x, dt, a, b, c, chunk: int = CHUNK, state=None):
    """The SSD scan over a whole sequence, chunk by chunk (`ssd_minimal_discrete` with
    X = x dt and A = a dt).

    x: (..., T, H, P); dt: (..., T, H); a: (H,) (negative); b, c: (..., T, N) (one group);
    state: (..., H, P, N) or None. Returns y (..., T, H, P) (without the D skip) and the
    state after the last token."""
    t = x.shape[-3]
    ft = _f32(x.dtype)
    n = max(1, -(-t // chunk))
    xd = _chunks((x * dt[..., None]).astype(ft), n, chunk, -3)  # (..., n, C, H, P)
    ad = _chunks((dt * a).astype(ft), n, chunk, -2)  # (..., n, C, H)
    b, c = (_chunks(z.astype(ft), n, chunk, -2) for z in (b, c))  # (..., n, C, N)
    ad = jnp.moveaxis(ad, -1, -3)  # (..., H, n, C)
    a_cum = jnp.cumsum(ad, axis=-1)
    decay = _decay_matrix(a_cum)  # (..., H, n, C, C): exp(A_i - A_j), j <= i
    y_diag = jnp.einsum("...cln,...csn,...hcls,...cshp->...clhp", c, b, decay, xd)
    to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # (..., H, n, C)
    written = jnp.einsum("...cln,...hcl,...clhp->...chpn", b, to_end, xd)  # (..., n, H, P, N)
    chunk_decay = jnp.exp(a_cum[..., -1])  # (..., H, n)

    lead = x.shape[:-3]
    h_, p_, n_ = x.shape[-2], x.shape[-1], b.shape[-1]
    s0 = jnp.zeros((*lead, h_, p_, n_), ft) if state is None else state.astype(ft)

    def step(s, xs):
        w_c, d_c = xs
        return s * d_c[..., None, None] + w_c, s  # the state entering each chunk

    per_chunk = lambda z, axis: jnp.moveaxis(z, axis, 0)  # noqa: E731
    xs = (per_chunk(written, len(lead)), per_chunk(chunk_decay, -1))
    s, entering = jax.lax.scan(step, s0, xs)
    entering = jnp.moveaxis(entering, 0, len(lead))  # (..., n, H, P, N)
    y_off = jnp.einsum("...cln,...chpn,...hcl->...clhp", c, entering, jnp.exp(a_cum))
    y = (y_diag + y_off).reshape(*lead, n * chunk, h_, p_)[..., :t, :, :]
    return y, s


def ssd_step(x, dt, a, b, c, state):
    """One token: x (..., H, P); dt (..., H); b, c (..., N); state (..., H, P, N)."""
    ft = _f32(x.dtype)
    x, dt, b, c = (z.astype(ft) for z in (x, dt, b, c))
    s = state.astype(ft) * jnp.exp(dt * a)[..., None, None]
    s = s + (dt[..., None] * x)[..., :, None] * b[..., None, None, :]
    return jnp.einsum("...hpn,...n->...hp", s, c), s


class Mamba2(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.inner, self.heads, self.state = inner, h, n = mamba_dims(cfg)
        self.head_dim = inner // h
        self.w_in = nnx.Param(_normal(rngs, (d, 2 * inner + 2 * n + h), dtype))
        self.conv = nnx.Param(_conv_init(rngs, inner + 2 * n, dtype))
        bound = 1 / math.sqrt(CONV)
        self.conv_bias = nnx.Param(
            jax.random.uniform(rngs.params(), (inner + 2 * n,), dtype, -bound, bound)
        )
        self.a_log = nnx.Param(_a_log(rngs, h, dtype))
        self.dt_bias = nnx.Param(_dt_bias(rngs, h, dtype))
        self.d = nnx.Param(jnp.ones((h,), dtype))
        self.norm = nnx.Param(jnp.ones((inner,), dtype))
        self.w_out = nnx.Param(_normal(rngs, (inner, d), dtype))

    def empty(self, lead: tuple[int, ...], dtype) -> RecurrentState:
        return RecurrentState(
            jnp.zeros((*lead, CONV - 1, self.inner + 2 * self.state), dtype),
            jnp.zeros((*lead, self.heads, self.head_dim, self.state), _f32(dtype)),
        )

    def __call__(self, x, positions, window=None, kernel="dense", cache=None, chunk=CHUNK):
        dt_, inner, h, n = x.dtype, self.inner, self.heads, self.state
        zxbcdt = x @ self.w_in[...].astype(dt_)
        z, xbc, dt = jnp.split(zxbcdt, [inner, 2 * inner + 2 * n], axis=-1)
        xbc, conv = causal_conv(
            xbc, self.conv[...], self.conv_bias[...], None if cache is None else cache.conv
        )
        xbc = jax.nn.silu(xbc)
        xs, b, c = jnp.split(xbc, [inner, inner + n], axis=-1)
        xs = xs.reshape(*xs.shape[:-1], h, self.head_dim)
        ft = _f32(dt_)
        dt = jax.nn.softplus(dt.astype(ft) + self.dt_bias[...].astype(ft))
        a = -jnp.exp(self.a_log[...].astype(ft))
        state = None if cache is None else cache.ssm
        if x.shape[-2] == 1 and cache is not None:  # decoding: the recurrence itself
            y, s = ssd_step(xs[..., 0, :, :], dt[..., 0, :], a, b[..., 0, :], c[..., 0, :], state)
            y = y[..., None, :, :]
        else:
            y, s = ssd_chunked(xs, dt, a, b, c, chunk, state)
        y = y + self.d[...].astype(ft)[:, None] * xs.astype(ft)
        y = y.reshape(*y.shape[:-2], inner) * jax.nn.silu(z.astype(ft))
        y = _rms(y) * self.norm[...].astype(ft)
        return y.astype(dt_) @ self.w_out[...].astype(dt_), RecurrentState(conv, s)


RECURRENT_LAYERS = {"gated_deltanet": GatedDeltaNet, "mamba2": Mamba2}
