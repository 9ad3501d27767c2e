"""The jitted train and eval steps, written functionally over (graphdef, params).

Data parallelism: the batch is sharded over a 1-D `data` mesh of all local devices and
parameters are replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ttt.config import Config
from ttt.model.kernels import resolve
from ttt.model.loop import loss_fn
from ttt.train.optim import Hyper, inner_lr, optimizer, outer_lr


def data_mesh(devices=None) -> jax.sharding.Mesh:
    """All devices of all processes (a multi-host run joins them with jax.distributed)."""
    devices = devices if devices is not None else jax.devices()
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_putter(mesh):
    """Host batch -> global arrays sharded over `data`. Every process reads the same
    global batch (same seed, same position) and contributes its own rows."""
    shard = batch_sharding(mesh)
    nproc, pid = jax.process_count(), jax.process_index()

    def put(batch):
        if nproc == 1:
            return jax.device_put(tuple(jnp.asarray(x) for x in batch), shard)
        rows = batch[0].shape[0] // nproc
        return tuple(
            jax.make_array_from_process_local_data(
                shard, np.asarray(x[pid * rows : (pid + 1) * rows]), x.shape
            )
            for x in batch
        )

    return put


def uses_inner_loop(cfg: Config, training: bool) -> bool:
    """Training runs the inner loop only with meta-learning; evaluation always does."""
    return cfg.model.mixer == "ttt_e2e" and (cfg.ttt.meta or not training)


def make_train_step(cfg: Config, graphdef):
    """`step(params, opt_state, batch, hyper) -> (params, opt_state, metrics)`."""
    tx = optimizer(cfg)
    accum = cfg.train.grad_accum
    inner = uses_inner_loop(cfg, training=True)
    kernels = resolve(cfg, first_order=False)  # the outer gradient goes through the chunks

    def grads_of(params, batch, eta):
        def f(p):
            loss, _ = loss_fn(graphdef, p, batch, eta, cfg.ttt, inner=inner, kernels=kernels)
            return loss

        return jax.value_and_grad(f)(params)

    def step(params, opt_state, batch, h: Hyper):
        eta = inner_lr(h)
        if accum == 1:
            loss, grads = grads_of(params, batch, eta)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def body(carry, mb):
                loss, g = grads_of(params, mb, eta)
                return jax.tree.map(jnp.add, carry, (loss, g)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zero, micro)
            loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, opt_state, params)
        lr = outer_lr(h)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr,
            "inner_lr": eta,
        }
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(cfg: Config, graphdef, inner: bool = True, hits: bool = False):
    """`eval(params, batch, eta) -> (per-token NLL (B, T), loss)`; runs the inner loop for
    ttt_e2e whatever `meta` says (test-time training), unless `inner` is False (the
    meta-learned initial weights alone). The loss is the training objective: with the
    inner loop, the mean over sequences of each one's mean chunk loss. With `hits`, also
    whether each target is the most likely token: `(nll, loss, hit)`."""
    inner = inner and uses_inner_loop(cfg, training=False)
    # Nothing differentiates evaluation, so the chunks may use ttt.chunk_attention.
    kernels = resolve(cfg, first_order=True)

    @jax.jit
    def evaluate(params, batch, eta):
        loss, nll = loss_fn(
            graphdef, params, batch, eta, cfg.ttt, inner=inner, kernels=kernels, hits=hits
        )
        return (nll[0], loss, nll[1]) if hits else (nll, loss)

    return evaluate


def init_opt_state(cfg: Config, params):
    return optimizer(cfg).init(params)
