"""The meta-gradient flows through every inner update: finite differences in float64."""

import jax
import jax.numpy as jnp
from conftest import random_batch
from flax import nnx

from ttt.model import create_model, loss_fn


def test_meta_gradient_matches_finite_differences(pico):
    with jax.enable_x64(True):
        cfg = pico(
            "model.param_dtype=float64",
            "model.compute_dtype=float64",
            "data.seq_len=48",
            "model.window=16",
        )
        graphdef, params = nnx.split(create_model(cfg.model, seed=0))
        batch = random_batch(jax.random.key(0), 2, cfg.data.seq_len)
        lr = jnp.float64(3.0)

        def loss(p, inner):
            return loss_fn(graphdef, p, batch, lr, cfg.ttt, inner=inner)[0]

        meta = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
        plain = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
        f = jax.jit(lambda p: loss(p, True))

        def directional(path):
            """grad . u against (f(p + eps u) - f(p - eps u)) / 2 eps for a random u."""
            leaf = _get(params, path)
            u = jax.random.normal(jax.random.key(len(path)), leaf.shape, jnp.float64)
            eps = 1e-5
            fd = (f(_add(params, path, eps * u)) - f(_add(params, path, -eps * u))) / (2 * eps)
            return (
                float(jnp.vdot(_get(meta, path), u)),
                float(fd),
                float(jnp.vdot(_get(plain, path), u)),
            )

        for path in [("prefix", "attn", "wq"), ("suffix", "prime_mlp", "w1")]:
            analytic, fd, first_order = directional(path)
            assert abs(analytic - fd) <= 1e-4 * abs(fd), (path, analytic, fd)
            # meta: false trains the plain network, whose gradient is a different vector.
            assert abs(first_order - analytic) > 1e-2 * abs(analytic), (path, first_order)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree[...]


def _add(params, path, delta):
    params = jax.tree.map(lambda x: x, params)  # a copy with fresh Variables
    node = params
    for key in path:
        node = node[key]
    node.set_value(node[...] + delta)
    return params
