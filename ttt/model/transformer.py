"""The decoder: embedding, `prefix` blocks (run once over the whole sequence) and
`suffix` blocks (the last `ttt_layers`, which carry prime MLPs and learn at test time).

Blocks of each group are stacked along a leading layer axis (`nnx.vmap` at init) and
applied with `jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt.config import ModelConfig
from ttt.model.layers import INIT_STD, Block, RMSNorm


def compute_dtype(cfg: ModelConfig):
    if cfg.compute_dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(cfg.compute_dtype)


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
        return None if self.cfg.mixer == "full" else self.cfg.window

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
):
    """Apply stacked blocks in order over whole sequences (no cache), attending with
    `kernel`. With `keep` > 0, also each layer's keys and values of the last `keep`
    positions, front-padded with zeros when there are fewer (a decoder's KV cache)."""
    if blocks is None:
        return x
    graphdef, state = nnx.split(blocks)

    def last(t):  # (..., T, H, D) -> (..., keep, H, D)
        pad = keep - t.shape[-3]
        if pad > 0:
            return jnp.pad(t, [(0, 0)] * (t.ndim - 3) + [(pad, 0), (0, 0), (0, 0)])
        return t[..., t.shape[-3] - keep :, :, :]

    def body(h, layer_state):
        h, kv = nnx.merge(graphdef, layer_state)(h, positions, window, kernel)
        return h, (jax.tree.map(last, kv) if keep else None)

    if remat:
        body = jax.checkpoint(body)
    x, kv = jax.lax.scan(body, x, state)
    return (x, kv) if keep else x


def scan_cached(graphdef, states: tuple, h, positions, cache, window, kernel="dense", remat=False):
    """Apply stacked blocks (`graphdef` merged with the layer slices of `states`) to `h`
    at `positions`, each layer attending over its KV cache `(k, v, k_pos)` too (k, v
    stacked on the layer axis). Returns the output and each layer's new (k, v)."""
    ck, cv, cpos = cache

    def layer(x, xs):
        *parts, k_l, v_l = xs
        return nnx.merge(graphdef, *parts)(x, positions, window, kernel, (k_l, v_l, cpos))

    if remat:
        layer = jax.checkpoint(layer)
    return jax.lax.scan(layer, h, (*states, ck, cv))


def create_model(cfg: ModelConfig, seed: int = 0) -> TTTModel:
    return TTTModel(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> TTTModel:
    """Shapes and dtypes only: no weight is allocated (`jax.eval_shape` underneath)."""
    return nnx.eval_shape(lambda: create_model(cfg))
