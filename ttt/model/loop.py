"""The inner loop of TTT-E2E and the per-token loss for every mixer.

For `ttt_e2e` the prefix blocks run once over the whole sequence with SWA; the suffix
blocks then run chunk by chunk. Each chunk's loss is taken with the current inner
weights W_{i-1} *before* they are updated on that chunk, so prediction stays causal:

    g   = clip(grad_W loss_i(W_{i-1}), inner_clip)      # prime-MLP weights only
    W_i = W_{i-1} - inner_lr * g

Each suffix attention layer carries the normed, rotated keys and values of the last
`window` tokens from one chunk to the next. Everything is differentiable, so with
`meta: true` the outer gradient flows through every inner update (grad of grad).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.config import TTTConfig
from ttt.model.kernels import DENSE, Kernels
from ttt.model.layers import FastParam
from ttt.model.transformer import TTTModel, scan_blocks, scan_cached


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Next-token negative log-likelihood in fp32, shape of `targets`."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


# Largest (tokens x vocab) logits block computed at once. With the paper's 128K
# vocabulary the logits of 8 x 8K tokens are 32 GB in fp32; blocks of 2^27 entries are
# 0.5 GB and still large enough to keep the unembedding matmul efficient.
LOGITS_BLOCK = 2**27


def token_hit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Whether the target is the most likely token (greedy decoding would emit it)."""
    return jnp.argmax(logits, axis=-1) == targets


def hidden_nll(
    model: TTTModel, x: jax.Array, targets: jax.Array, block=LOGITS_BLOCK, hits: bool = False
):
    """`token_nll(model.logits(x), targets)` without keeping the logits; with `hits`, the
    pair (NLL, `token_hit`) from the same logits (evaluation's exact-match accuracy).

    x: (..., T, d). Positions are cut into as few equal blocks as keep each block's logits
    under `block` entries; each block's logits are recomputed in the backward pass
    (`jax.checkpoint`) rather than stored, so memory holds one block at a time.
    """

    def scores(xb, tb):
        logits = model.logits(xb)
        nll = token_nll(logits, tb)
        return (nll, token_hit(logits, tb)) if hits else nll

    nll_of = jax.checkpoint(scores)
    seq_len = x.shape[-2]
    need = -(-math.prod(x.shape[:-1]) * model.cfg.vocab_size // block)
    n = next(n for n in range(max(need, 1), seq_len + 1) if seq_len % n == 0)
    if n == 1:
        return nll_of(x, targets)
    xb = jnp.moveaxis(x.reshape(*x.shape[:-2], n, seq_len // n, x.shape[-1]), -3, 0)
    tb = jnp.moveaxis(targets.reshape(*targets.shape[:-1], n, seq_len // n), -2, 0)
    nll = jax.lax.map(lambda a: nll_of(*a), (xb, tb))
    return jax.tree.map(lambda v: jnp.moveaxis(v, 0, -2).reshape(targets.shape), nll)


def nll_part(scores):
    """The NLL of what `hidden_nll` returned (with `hits`, the pair's first)."""
    return scores[0] if isinstance(scores, tuple) else scores


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def clip_by_global_norm(tree, max_norm):
    """Scale `tree` to global norm <= max_norm, with a gradient that is finite at zero.

    The plain sqrt has an infinite derivative at 0, which would turn the meta-gradient
    into NaN whenever an inner gradient vanishes (e.g. a fully masked chunk).
    """
    sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree))
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    scale = max_norm / jnp.maximum(norm, max_norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), tree)


def carry_window(cache: jax.Array, new: jax.Array, axis: int) -> jax.Array:
    """The KV window for the next chunk: the last `cache.shape[axis]` entries of cache ++ new."""
    both = jnp.concatenate([cache, new], axis=axis)
    keep = cache.shape[axis]
    return jax.lax.slice_in_dim(both, both.shape[axis] - keep, both.shape[axis], axis=axis)


def plain_hidden(model: TTTModel, inputs: jax.Array, kernels: Kernels = DENSE) -> jax.Array:
    """Last hidden states (before the final norm) over whole sequences, no inner updates:
    `full`, `swa`, and `ttt_e2e` trained with `meta: false` or evaluated with its
    initial weights."""
    positions = jnp.arange(inputs.shape[-1])
    x = model.embed_tokens(inputs)
    remat = kernels.remat != "none"
    x = scan_blocks(
        model.prefix, x, positions, model.window, kernels.sequence, remat, full=model.full_layers
    )
    return scan_blocks(model.suffix, x, positions, model.window, kernels.sequence, remat)


def cache_plan(n_chunks: int, chunk: int, cache_len: int, phases: int) -> list[tuple[int, int]]:
    """Cut the chunk loop into at most `phases` runs of consecutive chunks, each as
    `(chunks, cache size)`: the run's chunks attend over a KV cache of that static size.

    Before chunk i there are only i * chunk tokens, so one cache sized for the last chunk
    makes the early chunks score (chunk x cache) blocks that are all masked. A run of
    chunks a..b-1 instead gets min(b * chunk, cache_len) slots: enough for its own
    chunks and for what it hands to the next run. The cut minimises the total
    (queries x keys) scored. Every run is one `lax.scan`, compiled on its own, which is
    the price of more phases.
    """

    def size(b):  # the cache of a run that ends before chunk b
        return min(b * chunk, cache_len)

    def cost(a, b):
        return (b - a) * (size(b) + chunk)

    inf = float("inf")
    # best[p][j]: the least cost of chunks 0..j-1 in p runs, and where the last run starts
    best = [[(inf, 0)] * (n_chunks + 1) for _ in range(phases + 1)]
    best[0][0] = (0, 0)
    for p in range(1, phases + 1):
        for j in range(1, n_chunks + 1):
            best[p][j] = min((best[p - 1][i][0] + cost(i, j), i) for i in range(j))
    p = min(range(1, phases + 1), key=lambda q: (best[q][n_chunks][0], q))
    runs, j = [], n_chunks
    while j:
        i = best[p][j][1]
        runs.append((j - i, size(j)))
        j, p = i, p - 1
    return runs[::-1]


class Suffix:
    """The TTT blocks with their slow weights fixed: a forward over some positions given
    the fast (prime-MLP) weights and each layer's KV cache, and the inner update on one
    chunk. The inner loop and decoding (`ttt.model.decode`) share it."""

    def __init__(self, model: TTTModel, graphdef, slow, kernels: Kernels = DENSE, hits=False):
        self.model, self.graphdef, self.slow, self.kernels = model, graphdef, slow, kernels
        self.hits = hits  # per-token scores are (NLL, hit) pairs (`hidden_nll`)

    def forward(self, fast, cache, h, positions, kernel: str | None = None):
        """h: (n, d) at `positions` (n,); cache: per-layer (k, v) of earlier tokens and
        their positions. Returns the last hidden states and each layer's new (k, v)."""
        return scan_cached(
            self.graphdef,
            (fast, self.slow),
            h,
            positions,
            cache,
            self.model.cfg.window,
            kernel or self.kernels.chunk,
            self.kernels.remat == "block",
        )

    def chunk_loss(self, fast, cache, h, positions, targets, mask):
        x, kv = self.forward(fast, cache, h, positions)
        nll = hidden_nll(self.model, x, targets, hits=self.hits)
        return masked_mean(nll_part(nll), mask), (nll, kv)

    def grad(self, fast, cache, h, positions, targets, mask):
        """A chunk's loss, NLL and (k, v) with `fast`, and the gradient of that loss."""
        grad_fn = jax.value_and_grad(self.chunk_loss, has_aux=True)
        (loss, (nll, kv)), g = grad_fn(fast, cache, h, positions, targets, mask)
        return loss, nll, kv, g

    @staticmethod
    def step(fast, g, inner_lr, ttt: TTTConfig):
        """`fast - inner_lr * clip(g)`, and the clipped gradient."""
        g = clip_by_global_norm(g, ttt.inner_clip)
        return jax.tree.map(lambda w, gw: w - (inner_lr * gw).astype(w.dtype), fast, g), g

    def update(self, fast, cache, h, positions, targets, mask, inner_lr, ttt: TTTConfig):
        """One inner step on a chunk: its loss and NLL with `fast` (before the update, so
        prediction stays causal), then `fast - inner_lr * clip(grad)`."""
        loss, nll, kv, g = self.grad(fast, cache, h, positions, targets, mask)
        return self.step(fast, g, inner_lr, ttt)[0], loss, nll, kv

    def chunk_step(self, carry, chunk, inner_lr, ttt: TTTConfig):
        """One chunk of the inner loop, the scan step that `suffix_loop` and telemetry
        share: the chunk's loss and NLL under the carried fast weights, the update on it,
        and the KV window carried on. `carry`: (fast, k, v, k positions); `chunk`: (h,
        positions, targets, mask). Returns (carry, (loss, nll, grad, clipped grad))."""
        fast, ck, cv, cpos = carry
        h_c, pos_c, tgt_c, mask_c = chunk
        loss, nll, (k_new, v_new), g = self.grad(fast, (ck, cv, cpos), h_c, pos_c, tgt_c, mask_c)
        new, clipped = self.step(fast, g, inner_lr, ttt)
        ck, cv = carry_window(ck, k_new, axis=1), carry_window(cv, v_new, axis=1)
        return (new, ck, cv, carry_window(cpos, pos_c, axis=0)), (loss, nll, g, clipped)


def inner_loop_nll(
    model: TTTModel,
    inputs: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    inner_lr: jax.Array,
    ttt: TTTConfig,
    kernels: Kernels = DENSE,
    hits: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL (B, T) under test-time training (with `hits`, (NLL, hit) pairs), and
    each sequence's loss (B,): the mean of its chunk losses. The prefix blocks run once
    over the whole sequences; the chunks attend with `kernels.chunk`."""
    h = prefix_hidden(model, inputs, kernels)
    return suffix_loop(model, h, targets, mask, inner_lr, ttt, kernels, hits=hits)


def prefix_hidden(model: TTTModel, inputs: jax.Array, kernels: Kernels = DENSE) -> jax.Array:
    """ttt_e2e's prefix blocks once over whole sequences (SWA): the suffix's input."""
    return scan_blocks(
        model.prefix,
        model.embed_tokens(inputs),
        jnp.arange(inputs.shape[-1]),
        model.cfg.window,
        kernels.sequence,
        kernels.remat == "block",
    )


def suffix_loop(
    model: TTTModel,
    h: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    inner_lr: jax.Array,
    ttt: TTTConfig,
    kernels: Kernels = DENSE,
    final_state: bool = False,
    hits: bool = False,
):
    """The suffix blocks chunk by chunk over the prefix's outputs `h` (B, T, d), from the
    initial fast weights and an empty KV cache: per-token NLL (B, T) and each sequence's
    mean chunk loss (B,). With `final_state`, also each sequence's state after its last
    chunk (fast weights, KV cache and its positions): what decoding continues from."""
    batch, seq_len = targets.shape
    chunk, window = ttt.chunk, model.cfg.window
    n_chunks = seq_len // chunk
    # Enough for every query to see its window; a decoder continuing after the last
    # chunk needs a whole window.
    cache_len = window if final_state else min(window, seq_len - chunk)
    positions = jnp.arange(seq_len)
    remat = kernels.remat

    graphdef, fast0, slow = nnx.split(model.suffix, FastParam, ...)
    n_layers = model.cfg.ttt_layers
    heads, head_dim = model.cfg.heads, model.cfg.width // model.cfg.heads
    suffix = Suffix(model, graphdef, slow, kernels, hits)

    def step(carry, xs):
        carry, (loss, nll, _, _) = suffix.chunk_step(carry, xs, inner_lr, ttt)
        return carry, (loss, nll)

    if remat == "inner":
        step = jax.checkpoint(step)

    def grow(ck, cv, cpos, size):
        """Front-pad the cache to `size` slots. Empty slots sit at negative positions,
        which the attention mask drops."""
        pad = size - cpos.shape[0]
        zeros = jnp.zeros((n_layers, pad, heads, head_dim), ck.dtype)
        cpos = jnp.concatenate([jnp.full((pad,), -1, cpos.dtype), cpos])
        return jnp.concatenate([zeros, ck], 1), jnp.concatenate([zeros, cv], 1), cpos

    def one_sequence(h_s, tgt_s, mask_s):
        xs = (
            h_s.reshape(n_chunks, chunk, -1),
            positions.reshape(n_chunks, chunk),
            tgt_s.reshape(n_chunks, chunk),
            mask_s.reshape(n_chunks, chunk),
        )
        ck = jnp.zeros((n_layers, 0, heads, head_dim), h_s.dtype)
        carry, start, losses, nll = (fast0, ck, ck, jnp.arange(0)), 0, [], []
        for count, size in cache_plan(n_chunks, chunk, cache_len, ttt.cache_phases):
            fast, ck, cv, cpos = carry
            carry = (fast, *grow(ck, cv, cpos, size))
            part = jax.tree.map(lambda x: x[start : start + count], xs)  # noqa: B023
            carry, (l_run, nll_run) = jax.lax.scan(step, carry, part)
            losses.append(l_run)
            nll.append(nll_run)
            start += count
        per_token = jax.tree.map(lambda *runs: jnp.concatenate(runs).reshape(seq_len), *nll)
        out = per_token, jnp.mean(jnp.concatenate(losses))
        return (*out, carry) if final_state else out

    return jax.vmap(one_sequence)(h, targets, mask)


def sequence_nll(
    model: TTTModel,
    batch: tuple[jax.Array, jax.Array, jax.Array],
    inner_lr: jax.Array,
    ttt: TTTConfig,
    *,
    inner: bool,
    kernels: Kernels = DENSE,
    hits: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(loss, per-token NLL of shape (B, T)) for a batch `(inputs, targets, loss_mask)`;
    with `hits`, (NLL, hit) pairs in place of the NLL (`hidden_nll`).

    `inner=True` runs test-time training (ttt_e2e only); the loss is then the mean over
    sequences of the mean chunk loss. Otherwise it is the masked mean token NLL.
    `kernels` (`ttt.model.kernels.resolve`) carries the attention kernels and remat.
    """
    inputs, targets, mask = batch
    if inner:
        if model.suffix is None:
            raise ValueError("the inner loop needs mixer ttt_e2e")
        nll, seq_loss = inner_loop_nll(model, inputs, targets, mask, inner_lr, ttt, kernels, hits)
        return jnp.mean(seq_loss), nll
    nll = hidden_nll(model, plain_hidden(model, inputs, kernels), targets, hits=hits)
    return masked_mean(nll_part(nll), mask), nll


def loss_fn(
    graphdef,
    params,
    batch,
    inner_lr,
    ttt: TTTConfig,
    *,
    inner: bool,
    kernels: Kernels = DENSE,
    hits: bool = False,
):
    """The functional form used under `jax.jit`/`jax.grad`: merge happens at trace time only."""
    model = nnx.merge(graphdef, params)
    return sequence_nll(model, batch, inner_lr, ttt, inner=inner, kernels=kernels, hits=hits)
