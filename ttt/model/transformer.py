"""The decoder: embedding, `prefix` blocks (run once over the whole sequence) and
`suffix` blocks (the last `ttt_layers`, which carry prime MLPs and learn at test time).

Blocks of each group are stacked along a leading layer axis (`nnx.vmap` at init) and
applied with `jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt.config import ModelConfig
from ttt.model.block import Block
from ttt.model.kvb import FastState
from ttt.model.layers import INIT_STD, RMSNorm
from ttt.model.recurrent import RecurrentState
from ttt.shapes import RECURRENT


def compute_dtype(cfg: ModelConfig, backend: str | None = None):
    """`backend`: where the model will run, when that is not this process (an estimate
    made on a CPU for a GPU); this process's backend otherwise."""
    if cfg.compute_dtype == "auto":
        backend = backend or jax.default_backend()
        return jnp.bfloat16 if backend in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(cfg.compute_dtype)


def attention_window(cfg: ModelConfig) -> int | None:
    """The attention layers' sliding window (the SWA layers' for `hybrid`); None for
    full attention and for the recurrent mixers, which have no window."""
    return None if cfg.mixer in ("full", *RECURRENT) else cfg.window


def full_layers(cfg: ModelConfig):
    """`hybrid`: a bool per layer, True for full attention (every `full_every`-th layer,
    the paper's 5 SWA : 1 full at 6); None for every other mixer."""
    if cfg.mixer != "hybrid":
        return None
    return np.arange(1, cfg.layers + 1) % cfg.full_every == 0


def split_layers(cfg: ModelConfig) -> tuple[int, int]:
    """(prefix, suffix) block counts. Only ttt_e2e has suffix blocks."""
    suffix = cfg.ttt_layers if cfg.mixer == "ttt_e2e" else 0
    return cfg.layers - suffix, suffix


def _stack(n: int, cfg: ModelConfig, prime: bool, dtype, rngs: nnx.Rngs):
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return Block(cfg, prime=prime, dtype=dtype, rngs=r)

    return make(rngs)


class TTTModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        n_prefix, n_suffix = split_layers(cfg)
        self.embed = nnx.Param(
            INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.width), dtype)
        )
        self.prefix = _stack(n_prefix, cfg, False, dtype, rngs)
        self.suffix = _stack(n_suffix, cfg, True, dtype, rngs)
        self.final_norm = RMSNorm(cfg.width, dtype)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Param(
                INIT_STD * jax.random.normal(rngs.params(), (cfg.width, cfg.vocab_size), dtype)
            )

    @property
    def window(self) -> int | None:
        """The sliding window of the attention layers (of the SWA layers for `hybrid`)."""
        return attention_window(self.cfg)

    @property
    def full_layers(self):
        """`hybrid`: which prefix layers attend fully (every `full_every`-th); else None."""
        return full_layers(self.cfg)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(compute_dtype(self.cfg))

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            return x @ self.embed[...].astype(x.dtype).T
        return x @ self.unembed[...].astype(x.dtype)


def scan_blocks(
    blocks: Block | None,
    x,
    positions,
    window,
    kernel: str = "dense",
    remat: bool = False,
    keep: int = 0,
    full=None,
):
    """Apply stacked blocks in order over whole sequences (no cache), attending with
    `kernel`. With `keep` > 0, also each layer's keys and values of the last `keep`
    positions, front-padded with zeros when there are fewer (a decoder's KV cache), or a
    recurrent layer's state after the sequence. `full` (`hybrid`): a bool per layer,
    True where the layer attends fully instead of within `window`."""
    if blocks is None:
        return x
    graphdef, state = nnx.split(blocks)

    def last(t):  # (..., T, H, D) -> (..., keep, H, D)
        pad = keep - t.shape[-3]
        if pad > 0:
            return jnp.pad(t, [(0, 0)] * (t.ndim - 3) + [(pad, 0), (0, 0), (0, 0)])
        return t[..., t.shape[-3] - keep :, :, :]

    def body(h, xs):
        layer_state, is_full = xs
        is_full = None if full is None else is_full
        h, kv = _apply(graphdef, (layer_state,), h, positions, window, kernel, None, is_full)
        if not keep:
            return h, None
        if isinstance(kv, RecurrentState):
            return h, kv
        if isinstance(kv[-1], FastState):  # ttt_kvb: the KV cache and the fast state
            return h, (jax.tree.map(last, kv[0]), kv[1])
        return h, jax.tree.map(last, kv)

    if remat:
        body = jax.checkpoint(body)
    x, kv = jax.lax.scan(body, x, (state, _flags(full, state)))
    return (x, kv) if keep else x


def _flags(full, state):
    """The per-layer `full` flags as scan input (zeros where there is no hybrid)."""
    n = jax.tree.leaves(state)[0].shape[0]
    return jnp.zeros((n,), bool) if full is None else jnp.asarray(full[:n])


def _apply(graphdef, parts: tuple, h, positions, window, kernel, cache, is_full=None):
    """One block. A hybrid's layer (`is_full` given) picks its attention span by its
    flag: `window`, or where flagged all keys (both spans are compiled; the flag selects
    one at run time)."""
    block = lambda w: nnx.merge(graphdef, *parts)(h, positions, w, kernel, cache)  # noqa: E731
    if is_full is None:
        return block(window)
    return jax.lax.cond(is_full, lambda: block(None), lambda: block(window))


def scan_cached(
    graphdef, states: tuple, h, positions, cache, window, kernel="dense", remat=False, full=None
):
    """Apply stacked blocks (`graphdef` merged with the layer slices of `states`) to `h`
    at `positions`, each layer attending over its KV cache `(k, v, k_pos)` too (k, v
    stacked on the layer axis), or, for a recurrent layer, continuing from its state
    (`cache` is then the stacked `RecurrentState`). Returns the output and each layer's
    new (k, v), or new state. `ttt_kvb`: `cache` is `((k, v, k_pos), FastState)`, both
    stacked on the layer axis, and so is the output. `full`: as for `scan_blocks`."""
    flags = _flags(full, states[0])
    if isinstance(cache, RecurrentState):

        def step(x, xs):
            *parts, layer_cache, _ = xs
            return _apply(graphdef, parts, x, positions, window, kernel, layer_cache)

        return jax.lax.scan(step, h, (*states, cache, flags))
    if isinstance(cache[-1], FastState):
        (ck, cv, cpos), fast = cache

        def kvb_layer(x, xs):
            *parts, k_l, v_l, fast_l = xs
            layer_cache = ((k_l, v_l, cpos), fast_l)
            return _apply(graphdef, parts, x, positions, window, kernel, layer_cache)

        return jax.lax.scan(kvb_layer, h, (*states, ck, cv, fast))
    ck, cv, cpos = cache

    def layer(x, xs):
        *parts, k_l, v_l, is_full = xs
        is_full = None if full is None else is_full
        return _apply(graphdef, parts, x, positions, window, kernel, (k_l, v_l, cpos), is_full)

    if remat:
        layer = jax.checkpoint(layer)
    return jax.lax.scan(layer, h, (*states, ck, cv, flags))


def create_model(cfg: ModelConfig, seed: int = 0) -> TTTModel:
    return TTTModel(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> TTTModel:
    """Shapes and dtypes only: no weight is allocated (`jax.eval_shape` underneath)."""
    return nnx.eval_shape(lambda: create_model(cfg))
