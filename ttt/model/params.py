"""Parameter counts from shapes alone (`jax.eval_shape`): usable for the 3B preset on a laptop."""

from __future__ import annotations

import math

import jax
from flax import nnx

from ttt.config import ModelConfig
from ttt.model.layers import FastParam, InitialFast
from ttt.model.transformer import create_model


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, embedding, non_embedding and inner (the weights trained at test time: the
    prime MLPs, or ttt_kvb's initial fast weights)."""
    state = jax.eval_shape(lambda: nnx.split(create_model(cfg))[1])
    fast = jax.eval_shape(
        lambda: nnx.split(create_model(cfg), nnx.Any(FastParam, InitialFast), ...)[1]
    )
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    total = size(state)
    embedding = cfg.vocab_size * cfg.width * (1 if cfg.tie_embeddings else 2)
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "inner": size(fast),
    }
