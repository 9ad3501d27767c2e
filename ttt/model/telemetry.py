"""What each inner step does, chunk by chunk (`ttt eval --telemetry`).

For chunk i of each sequence, with W_{i-1} the fast weights before its update and W_i
after it (the same step as `loop.Suffix.update`):

- `loss_before`: chunk i's loss under W_{i-1} (what evaluation reports for it);
- `loss_after`: chunk i's loss under W_i: what the update bought on the chunk it learned
  from;
- `next_before`, `next_after`: chunk i+1's loss under W_{i-1} and under W_i (the latter is
  chunk i+1's own `loss_before`): what the update bought *ahead*, the quantity test-time
  training exists for (NaN for the last chunk, which has no next);
- per TTT layer: the inner gradient's norm before and after clipping (`ttt.inner_clip`
  clips the global norm over the layers), and the update's size relative to the
  weights, ||W_i - W_{i-1}|| / ||W_{i-1}||.

Both `next` losses read chunk i+1 with the KV cache the loop carries after chunk i, so
only the fast weights differ. Evaluation only: nothing here is differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.config import TTTConfig
from ttt.model.kernels import DENSE, Kernels
from ttt.model.layers import FastParam
from ttt.model.loop import Suffix, prefix_hidden
from ttt.model.transformer import TTTModel

LOSSES = ("loss_before", "loss_after", "next_before", "next_after")
PER_LAYER = ("grad_norm", "clipped_grad_norm", "update_rel")


def _layer_norms(tree) -> jax.Array:
    """The L2 norm of each layer's slice of a tree stacked on the layer axis: (layers,)."""
    sq = sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(tree))
    return jnp.sqrt(sq)


def inner_telemetry(
    model: TTTModel,
    inputs: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    inner_lr: jax.Array,
    ttt: TTTConfig,
    kernels: Kernels = DENSE,
) -> dict[str, jax.Array]:
    """`LOSSES` as (B, chunks) and `PER_LAYER` as (B, chunks, ttt_layers), for a batch
    of sequences (B, T) read as evaluation reads them (one cache phase)."""
    seq_len, chunk, window = inputs.shape[-1], ttt.chunk, model.cfg.window
    n_chunks = seq_len // chunk
    positions = jnp.arange(seq_len)
    h = prefix_hidden(model, inputs, kernels)
    graphdef, fast0, slow = nnx.split(model.suffix, FastParam, ...)
    suffix = Suffix(model, graphdef, slow, kernels)
    layers, heads = model.cfg.ttt_layers, model.cfg.heads
    cache_len = max(1, min(window, seq_len - chunk))

    def step(carry, xs):
        here, (h_n, pos_n, tgt_n, mask_n), has_next = xs
        fast, cache = carry[0], carry[1:]
        carry, (before, _, g, clipped) = suffix.chunk_step(carry, here, inner_lr, ttt)
        new = carry[0]
        after, _ = suffix.chunk_loss(new, cache, *here)  # the same chunk, after its step
        ahead = carry[1:], h_n, pos_n, tgt_n, mask_n  # the next chunk, with the cache on
        next_before, _ = suffix.chunk_loss(fast, *ahead)
        next_after, _ = suffix.chunk_loss(new, *ahead)
        nan = jnp.float32(jnp.nan)
        delta = jax.tree.map(lambda a, b: a - b, new, fast)
        out = {
            "loss_before": before,
            "loss_after": after,
            "next_before": jnp.where(has_next, next_before, nan),
            "next_after": jnp.where(has_next, next_after, nan),
            "grad_norm": _layer_norms(g),
            "clipped_grad_norm": _layer_norms(clipped),
            "update_rel": _layer_norms(delta) / jnp.maximum(_layer_norms(fast), 1e-30),
        }
        return carry, out

    def one_sequence(h_s, tgt_s, mask_s):
        here = (
            h_s.reshape(n_chunks, chunk, -1),
            positions.reshape(n_chunks, chunk),
            tgt_s.reshape(n_chunks, chunk),
            mask_s.reshape(n_chunks, chunk),
        )
        ahead = jax.tree.map(lambda x: jnp.roll(x, -1, axis=0), here)  # the last has none
        has_next = jnp.arange(n_chunks) < n_chunks - 1
        zeros = jnp.zeros((layers, cache_len, heads, model.cfg.width // heads), h_s.dtype)
        carry = (fast0, zeros, zeros, jnp.full((cache_len,), -1, jnp.int32))
        _, out = jax.lax.scan(step, carry, (here, ahead, has_next))
        return out

    return jax.vmap(one_sequence)(h, targets, mask)
