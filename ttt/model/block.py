"""A block of the decoder, where the sequence mixers are assembled: attention (full,
SWA, the hybrid's layers and TTT-E2E's), TTT-KVB's attention with fast weights, or a
recurrent layer; then, in TTT blocks, the prime MLP; then the regular MLP.

Each sublayer is `x = x + PostNorm(F(PreNorm(x)))`.
"""

from __future__ import annotations

from flax import nnx

from ttt.config import ModelConfig
from ttt.model.kvb import KVBAttention
from ttt.model.layers import MLP, Attention, FastParam, HeadMLP, RMSNorm
from ttt.model.recurrent import RECURRENT_LAYERS


class Block(nnx.Module):
    """The sequence mixer (attention, or a recurrent layer for `gated_deltanet` and
    `mamba2`), then (TTT blocks only) the prime MLP, then the regular MLP."""

    def __init__(self, cfg: ModelConfig, *, prime: bool, dtype, rngs: nnx.Rngs):
        d = cfg.width
        self.attn_pre, self.attn_post = RMSNorm(d, dtype), RMSNorm(d, dtype)
        if cfg.mixer in RECURRENT_LAYERS:
            self.rnn = RECURRENT_LAYERS[cfg.mixer](cfg, dtype, rngs)
        elif cfg.mixer == "ttt_kvb":
            self.attn = KVBAttention(cfg, dtype, rngs)
        else:
            self.attn = Attention(cfg, dtype, rngs)
        if prime:
            self.prime_pre, self.prime_post = RMSNorm(d, dtype), RMSNorm(d, dtype)
            if cfg.fast_heads:
                self.prime_mlp = HeadMLP(d, cfg.mlp, cfg.fast_heads, dtype, rngs, FastParam)
            else:
                self.prime_mlp = MLP(d, cfg.mlp, dtype, rngs, param=FastParam)
        self.has_prime = prime
        self.mlp_pre, self.mlp_post = RMSNorm(d, dtype), RMSNorm(d, dtype)
        self.mlp = MLP(d, cfg.mlp, dtype, rngs)

    def __call__(self, x, positions, window: int | None, kernel: str = "dense", cache=None):
        """Returns the output and the mixer's own: this call's (k, v) for attention, the
        state after x for a recurrent layer."""
        mixer = self.rnn if hasattr(self, "rnn") else self.attn
        a, kv = mixer(self.attn_pre(x), positions, window, kernel, cache)
        x = x + self.attn_post(a)
        if self.has_prime:
            x = x + self.prime_post(self.prime_mlp(self.prime_pre(x)))
        x = x + self.mlp_post(self.mlp(self.mlp_pre(x)))
        return x, kv
