"""Helpers shared by the equivalence tests and `python -m ttt.gpu_check`: one model's
per-token NLL on a fixed random batch, so two forms of the same function can be compared."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.model.kernels import resolve
from ttt.model.loop import carry_window, loss_fn
from ttt.model.transformer import create_model


def random_batch(key, batch: int, seq_len: int, vocab: int = 256):
    """(inputs, targets, mask) of uniform random tokens."""
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0, vocab)
    return tokens[:, :-1], tokens[:, 1:], jnp.ones((batch, seq_len), bool)


def model_nll(cfg, params=None, *, inner, inner_lr=1.0, batch=None, first_order=False):
    """(loss, per-token NLL, params) of `cfg`'s model (seed 0, or `params`) on `batch`
    (default: two random sequences from key 0)."""
    graphdef, p0 = nnx.split(create_model(cfg.model, seed=0))
    params = p0 if params is None else params
    batch = batch or random_batch(jax.random.key(0), 2, cfg.data.seq_len)
    kernels = resolve(cfg, first_order=first_order)
    f = jax.jit(lambda p, b, lr: loss_fn(graphdef, p, b, lr, cfg.ttt, inner=inner, kernels=kernels))
    loss, nll = f(params, batch, jnp.float32(inner_lr))
    return loss, nll, params


def chunked_and_whole(attn, x: jax.Array, window: int, chunk: int):
    """One attention layer over `x` (T, d) twice: chunk by chunk, each chunk over a
    carried window of the previous keys and values, and over the whole sequence at once.
    Sliding-window attention makes the two equal."""

    pos = jnp.arange(x.shape[0])
    whole, _ = attn(x, pos, window)
    ck = cv = jnp.zeros((window, attn.heads, attn.head_dim), x.dtype)
    cpos, parts = jnp.arange(-window, 0), []
    for start in range(0, x.shape[0], chunk):
        sl = slice(start, start + chunk)
        out, (k, v) = attn(x[sl], pos[sl], window, cache=(ck, cv, cpos))
        parts.append(out)
        ck, cv, cpos = (
            carry_window(ck, k, 0),
            carry_window(cv, v, 0),
            carry_window(cpos, pos[sl], 0),
        )
    return jnp.concatenate(parts), whole
