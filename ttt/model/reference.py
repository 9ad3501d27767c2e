"""The reference implementation's checkpoint format, both ways.

Its `model_weights` item (an Orbax PyTree) names every weight under `language_model.model`:
`wte` (the tied embedding), `ln_f`, `h.blocks.*` (all blocks stacked on axis 0, the TTT
blocks last) and `h.prime_storage.*` (one prime MLP per TTT block). Matrices are stored
(in, out), `y = x @ w`, as ours are, so a weight maps to ours by name and a slice of the
layer axis, never by a transpose.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ttt.errors import UserError

ROOT = "language_model.model"
BLOCKS = f"{ROOT}.h.blocks"
PRIMES = f"{ROOT}.h.prime_storage"

# our path inside a block -> the reference's name inside `h.blocks`
BLOCK = {
    ("attn", "wq"): "seq_modeling_block.wq.weight",
    ("attn", "wk"): "seq_modeling_block.wk.weight",
    ("attn", "wv"): "seq_modeling_block.wv.weight",
    ("attn", "wo"): "seq_modeling_block.wo.weight",
    ("attn", "q_norm", "scale"): "seq_modeling_block.q_norm.weight",
    ("attn", "k_norm", "scale"): "seq_modeling_block.k_norm.weight",
    ("attn_pre", "scale"): "seq_norm.weight",
    ("attn_post", "scale"): "seq_post_norm.weight",
    ("mlp", "w1"): "feed_forward.w1.weight",
    ("mlp", "w2"): "feed_forward.w2.weight",
    ("mlp", "w3"): "feed_forward.w3.weight",
    ("mlp_pre", "scale"): "ffn_norm.weight",
    ("mlp_post", "scale"): "ffn_post_norm.weight",
}
# our path inside a TTT block -> the reference's name inside `h.prime_storage`
PRIME = {
    ("prime_mlp", "w1"): "feed_forward_prime.w1.weight",
    ("prime_mlp", "w2"): "feed_forward_prime.w2.weight",
    ("prime_mlp", "w3"): "feed_forward_prime.w3.weight",
    ("prime_pre", "scale"): "ffn_prime_norm.weight",
    ("prime_post", "scale"): "ffn_prime_post_norm.weight",
}
TOP = {("embed",): f"{ROOT}.wte.weight", ("final_norm", "scale"): f"{ROOT}.ln_f.weight"}


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """`{"a": {"b": x}}` -> `{"a.b": x}`. Empty leaves are dropped: the reference stores
    None for a module it does not use (the untied head, norm biases, step counters)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is not None:
            out[name] = value
    return out


def _nest(flat: Mapping) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _need(weights: Mapping, name: str):
    if name not in weights:
        raise UserError(f"checkpoint: weight {name} is missing")
    return weights[name]


def shapes(weights: Mapping) -> dict:
    """The model's shape keys, from the weights' shapes alone (`weights`: flat names to
    anything with `.shape`, arrays or Orbax metadata)."""
    vocab, width = _need(weights, TOP[("embed",)]).shape
    layers = _need(weights, f"{BLOCKS}.seq_modeling_block.wq.weight").shape[0]
    head_dim = _need(weights, f"{BLOCKS}.seq_modeling_block.q_norm.weight").shape[-1]
    mlp = _need(weights, f"{BLOCKS}.feed_forward.w1.weight").shape[-1]
    if width % head_dim:
        raise UserError(f"checkpoint: q_norm's head_dim {head_dim} does not divide width {width}")
    out = {
        "model.vocab_size": int(vocab),
        "model.width": int(width),
        "model.layers": int(layers),
        "model.heads": int(width // head_dim),
        "model.mlp": int(mlp),
        "model.tie_embeddings": True,
    }
    prime = weights.get(f"{PRIMES}.feed_forward_prime.w1.weight")
    if prime is not None:
        if prime.shape[-1] != mlp:  # one MLP width serves both MLPs of our blocks
            raise UserError(
                f"checkpoint: prime MLP width {prime.shape[-1]} differs from the MLP width "
                f"{mlp}; this model uses one width for both"
            )
        out["model.ttt_layers"] = int(prime.shape[0])
    return out


def has_prime(weights: Mapping) -> bool:
    return any(name.startswith(PRIMES + ".") for name in weights)


def to_ours(weights: Mapping, n_prefix: int, n_suffix: int, dtype=np.float32) -> dict:
    """Our pure-dict params from the reference's flat weights. Every reference weight must
    be used and every one of ours found. Slices of the layer axis are NumPy views, and
    `asarray` copies only where the dtype changes, so no weight is held twice."""
    used, flat = set(), {}

    def take(name, index=slice(None)):
        used.add(name)
        return np.asarray(_need(weights, name)[index], dtype=dtype)

    for ours, name in TOP.items():
        flat[ours] = take(name)
    groups = {"prefix": slice(0, n_prefix), "suffix": slice(n_prefix, n_prefix + n_suffix)}
    for group, layers in groups.items():
        if layers.stop == layers.start:
            continue
        for ours, name in BLOCK.items():
            flat[(group, *ours)] = take(f"{BLOCKS}.{name}", layers)
    if n_suffix:
        for ours, name in PRIME.items():
            flat[("suffix", *ours)] = take(f"{PRIMES}.{name}")
    unknown = sorted(set(weights) - used)
    if unknown:
        shown = ", ".join(unknown[:3]) + (
            f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        )
        raise UserError(f"checkpoint: weights this model has no place for: {shown}")
    return _nest(flat)


def from_ours(params: Mapping) -> dict:
    """The reference's nested `model_weights` tree from our pure-dict params (the inverse
    of `to_ours`; tests and the import benchmark write reference checkpoints with it)."""
    flat = {}
    for ours, name in TOP.items():
        flat[name] = _get(params, ours)
    groups = [params[g] for g in ("prefix", "suffix") if params.get(g)]
    for ours, name in BLOCK.items():
        flat[f"{BLOCKS}.{name}"] = np.concatenate([np.asarray(_get(g, ours)) for g in groups])
    if params.get("suffix") and "prime_mlp" in params["suffix"]:
        for ours, name in PRIME.items():
            flat[f"{PRIMES}.{name}"] = np.asarray(_get(params["suffix"], ours))
    return _nest({tuple(k.split(".")): np.asarray(v) for k, v in flat.items()})


def _get(tree: Mapping, path: tuple):
    for part in path:
        tree = tree[part]
    return tree
