"""Every mixer's shapes and parameter count, from the model config alone (no JAX): what
`ttt config show` prints, what the config uses to match a baseline's size to attention's
(as the paper does), and what tests/test_recurrent.py holds against the built model.

`m` is a `ttt.config.ModelConfig` (not imported here: the config imports this module).
"""

from __future__ import annotations

import dataclasses
import math

CONV = 4  # the recurrent layers' short convolution (both authors' default)
GDN_EXPAND_K, GDN_EXPAND_V = 0.75, 1.5  # Gated DeltaNet: key and value widths over d
MAMBA_EXPAND, MAMBA_HEAD = 2, 64  # Mamba 2: inner width over d, channels per head
RECURRENT = ("gated_deltanet", "mamba2")
KVB_EXPAND = 1  # ttt_kvb: each fast-weight head's hidden width over its head width
MLP_MULTIPLE = 8  # a matched MLP's hidden size is a multiple of this


def gdn_dims(m) -> tuple[int, int, int]:
    """Gated DeltaNet: (heads, key dim per head, value dim per head); the model's heads,
    keys 0.75 d and values 1.5 d wide in all (flash-linear-attention's layout)."""
    h = m.heads
    return h, max(1, round(GDN_EXPAND_K * m.width / h)), max(1, round(GDN_EXPAND_V * m.width / h))


def mamba_dims(m) -> tuple[int, int, int]:
    """Mamba 2: (inner width, heads of 64 channels, state size N)."""
    inner = MAMBA_EXPAND * m.width
    return inner, max(1, inner // MAMBA_HEAD), m.ssm_state


def mixer_params(m) -> int:
    """One block's sequence mixer."""
    d = m.width
    if m.mixer == "gated_deltanet":
        h, dk, dv = gdn_dims(m)
        # q, k, v, gate and output projections; alpha, beta; the convolution over q, k,
        # v; A_log and dt_bias per head; the per-head output norm
        return (
            d * h * (2 * dk + 2 * dv)
            + h * dv * d
            + 2 * d * h
            + CONV * h * (2 * dk + dv)
            + 2 * h
            + dv
        )
    if m.mixer == "mamba2":
        inner, h, n = mamba_dims(m)
        conv = inner + 2 * n  # x, B and C go through the convolution
        # in-projection (z, x, B, C, dt); convolution and its bias; A_log, dt_bias, D;
        # the gated norm; the out-projection
        return d * (2 * inner + 2 * n + h) + (CONV + 1) * conv + 3 * h + inner + inner * d
    attention = 4 * d * d + 2 * (d // m.heads)  # q, k, v, o and the QK-norm scales
    if m.mixer == "ttt_kvb":
        h, hd, f = kvb_dims(m)
        # the initial fast weights (a SwiGLU per head), the per-token LR projection and
        # the fast output's per-head norm
        return attention + 3 * h * hd * f + d * h + hd
    return attention


def kvb_dims(m) -> tuple[int, int, int]:
    """ttt_kvb's fast weights: (heads, width per head, hidden width per head); the
    attention's heads, as in LaCT."""
    hd = m.width // m.heads
    return m.heads, hd, KVB_EXPAND * hd


def prime_params(m) -> int:
    """A TTT block's prime MLP and its two norms; split into `fast_heads` heads, each
    head's SwiGLU is (width/h -> mlp/h -> width/h)."""
    heads = max(m.fast_heads, 1)
    return 3 * m.width * m.mlp // heads + 2 * m.width


def block_params(m, prime: bool = False) -> int:
    d = m.width
    mlp = 3 * d * m.mlp + 4 * d  # the MLP and the four norms around mixer and MLP
    return mixer_params(m) + mlp + (prime_params(m) if prime else 0)


def model_params(m) -> int:
    """The whole model: blocks (the last `ttt_layers` with a prime MLP under `ttt_e2e`),
    the embedding (and unembedding when untied) and the final norm."""
    suffix = m.ttt_layers if m.mixer == "ttt_e2e" else 0
    blocks = (m.layers - suffix) * block_params(m) + suffix * block_params(m, prime=True)
    embedding = m.vocab_size * m.width * (1 if m.tie_embeddings else 2)
    return blocks + embedding + m.width


def matched_mlp(m) -> int:
    """The MLP hidden size that gives the model the parameters of `full` with MLP
    `m.mlp` (to a multiple of `MLP_MULTIPLE` and of `fast_heads`, which splits the prime
    MLP). The count is linear in the MLP width, so two evaluations solve it."""

    target = model_params(dataclasses.replace(m, mixer="full"))
    at = lambda mlp: model_params(dataclasses.replace(m, mlp=mlp))  # noqa: E731
    step = math.lcm(MLP_MULTIPLE, max(m.fast_heads, 1))
    hidden = m.mlp + step * (target - at(m.mlp)) / (at(m.mlp + step) - at(m.mlp))
    return max(step, step * round(hidden / step))
