"""Closed-form model FLOPs per token, for tokens/s -> MFU.

Counting rules (a multiply-add is 2 FLOPs; only matmuls count):
- a block's forward costs 2 * (4 d^2 + 3 d m [+ 3 d m for a prime MLP]) per token, plus
  attention: 4 d * keys, where keys is the mean number of keys a query sees
  (causal: (T + 1) / 2 for `full`; min(i + 1, window) averaged over i for `swa`/`ttt_e2e`;
  per layer for `hybrid`);
- a recurrent block (`gated_deltanet`, `mamba2`) costs 2 * (its projections + 3 d m) plus
  its recurrence per token: 6 H d_k d_v for the gated delta rule (read the state for the
  prediction, write, read for the output), 4 * inner * N for Mamba 2 (write, read),
  whatever the context length;
- a `ttt_kvb` block adds its fast branch: per head and token, 6 D f for the output g(q)
  and 18 D f for the update (g(k) forward, then backward), plus 2 d H for the LR;
- a prime MLP split into `fast_heads` heads costs 1/heads of one MLP;
- the output projection costs 2 d V per token (tied or not);
- one differentiation triples a computation's cost (forward + 2x backward).

Training `full`/`swa` (and `ttt_e2e` with `meta: false`) costs 3 F. With the inner loop,
the suffix blocks and the logits run forward and backward for every chunk (3 F_suffix);
with `meta: true` the outer gradient differentiates that again (9 F_suffix), while the
prefix is differentiated once (3 F_prefix). Prefill with the inner loop costs
F_prefix + 3 F_suffix.
"""

from __future__ import annotations

from ttt.config import Config
from ttt.model.transformer import attention_window, full_layers, split_layers
from ttt.shapes import RECURRENT, gdn_dims, kvb_dims, mamba_dims, mixer_params


def mean_keys(seq_len: int, window: int | None) -> float:
    """Mean over query positions i of the number of keys i attends to."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..window-1 see i+1 keys; the rest see `window`.
    ramp = window * (window + 1) / 2
    return (ramp + (seq_len - window) * window) / seq_len


def block_flops(cfg: Config, prime: bool, keys: float) -> float:
    d, m = cfg.model.width, cfg.model.mlp
    mlp = 3 * d * m * (1 + (1 / max(cfg.model.fast_heads, 1) if prime else 0))
    if cfg.model.mixer in RECURRENT:
        return 2 * (mixer_params(cfg.model) + mlp) + recurrence_flops(cfg)
    fast = 0.0
    if cfg.model.mixer == "ttt_kvb":
        h, hd, f = kvb_dims(cfg.model)
        fast = 24 * h * hd * f + 2 * d * h
    return 2 * (4 * d * d + mlp) + 4 * d * keys + fast


def recurrence_flops(cfg: Config) -> float:
    if cfg.model.mixer == "gated_deltanet":
        h, dk, dv = gdn_dims(cfg.model)
        return 6 * h * dk * dv
    inner, _, n = mamba_dims(cfg.model)
    return 4 * inner * n


def layer_keys(cfg: Config) -> list[float]:
    """Each layer's mean keys per query (0 for a recurrent layer)."""
    m, t = cfg.model, cfg.data.seq_len
    if m.mixer in RECURRENT:
        return [0.0] * m.layers
    full = full_layers(m)
    window = attention_window(m)
    return [mean_keys(t, None if full is not None and full[i] else window) for i in range(m.layers)]


def flops_per_token(cfg: Config, *, training: bool, inner: bool) -> float:
    """Model FLOPs per token for one training step (`training`) or one prefill."""
    m = cfg.model
    n_prefix, n_suffix = split_layers(m)
    keys = layer_keys(cfg)
    prefix = sum(block_flops(cfg, False, k) for k in keys[:n_prefix])
    logits = 2 * m.width * m.vocab_size
    suffix = sum(block_flops(cfg, True, k) for k in keys[n_prefix:]) + logits
    if not inner:
        forward = prefix + suffix
        return 3 * forward if training else forward
    if training:
        return 3 * prefix + 9 * suffix
    return prefix + 3 * suffix


# Dense bf16 peak FLOP/s by device kind (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "h200": 989e12,
    "h100": 989e12,
    "gh200": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "a10g": 125e12,
    "b200": 2250e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
}


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
    """Per-device peak, or None where unknown (CPUs): MFU is then not reported."""
    if override > 0:
        return override
    kind = device_kind.lower()
    for name, value in PEAK_FLOPS.items():
        if name in kind:
            return value
    return None
