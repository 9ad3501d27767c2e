"""Outer optimizer and the two learning-rate schedules.

Both peak learning rates enter the compiled step as traced scalars (`Hyper`), never as
Python constants, so trials that differ only in `train.lr` or `ttt.inner_lr` run the
same XLA program and hit the persistent compilation cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ttt.config import Config


class Hyper(NamedTuple):
    """Per-step scalars fed to the jitted step."""

    step: jax.Array
    lr: jax.Array  # peak outer LR
    min_lr: jax.Array
    warmup_steps: jax.Array
    total_steps: jax.Array
    inner_lr: jax.Array  # eta
    inner_lr_init: jax.Array
    inner_warmup_steps: jax.Array


def hyper(cfg: Config, step: int) -> Hyper:
    t, tr = cfg.ttt, cfg.train
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return Hyper(
        step=f(step),
        lr=f(tr.lr),
        min_lr=f(tr.min_lr),
        warmup_steps=f(round(tr.warmup * tr.steps)),
        total_steps=f(tr.steps),
        inner_lr=f(t.inner_lr),
        inner_lr_init=f(t.inner_lr_init),
        inner_warmup_steps=f(round(t.inner_lr_warmup * tr.steps)),
    )


def outer_lr(h: Hyper) -> jax.Array:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` (capped at `lr`) at `total_steps`."""
    min_lr = jnp.minimum(h.min_lr, h.lr)
    warm = h.lr * (h.step + 1) / jnp.maximum(h.warmup_steps, 1)
    progress = jnp.clip(
        (h.step - h.warmup_steps) / jnp.maximum(h.total_steps - h.warmup_steps, 1), 0, 1
    )
    cosine = min_lr + 0.5 * (h.lr - min_lr) * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(h.step < h.warmup_steps, warm, cosine)


def inner_lr(h: Hyper) -> jax.Array:
    """Linear warm-up from `inner_lr_init` to `inner_lr` over the first outer steps."""
    frac = jnp.clip(h.step / jnp.maximum(h.inner_warmup_steps, 1), 0, 1)
    frac = jnp.where(h.inner_warmup_steps > 0, frac, 1.0)
    return h.inner_lr_init + frac * (h.inner_lr - h.inner_lr_init)


def _decay_mask(params):
    """Weight decay on weight matrices and the embedding, not on RMSNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params
    )


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW direction without the learning rate, which the step applies (traced)."""
    tr = cfg.train
    return optax.chain(
        optax.clip_by_global_norm(tr.clip),
        optax.scale_by_adam(b1=tr.b1, b2=tr.b2),
        optax.add_decayed_weights(tr.weight_decay, mask=_decay_mask),
    )
