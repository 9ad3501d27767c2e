"""The Fig 1 baselines as mixers: Gated DeltaNet's and Mamba 2's chunked forms against
their recurrences written plainly here (forward and gradient), chunk size, the hybrid's
layer pattern, and every mixer's parameter formula against the built model (causality of
every mixer: tests/test_ladder.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt.config import ConfigError, load_config
from ttt.model import create_model
from ttt.model.loop import plain_hidden
from ttt.model.recurrent import gated_delta_chunked, ssd_chunked
from ttt.model.transformer import abstract_model
from ttt.shapes import model_params

RNG = np.random.default_rng(0)


def gated_delta_loop(q, k, v, g, beta, s):
    """The gated delta rule one token at a time (one head): S <- exp(g) S; then
    S += k (beta (v - S^T k))^T; o = S^T q."""

    def token(s, x):
        q, k, v, g, beta = x
        s = s * jnp.exp(g)
        s = s + jnp.outer(k, beta * (v - s.T @ k))
        return s, s.T @ q

    s, out = jax.lax.scan(token, s, (q, k, v, g, beta))
    return out, s


def ssd_loop(x, dt, a, b, c, s):
    """Mamba 2's recurrence one token at a time (one head): h <- exp(dt a) h + dt x b^T;
    y = h c."""

    def token(s, xs):
        x, dt, b, c = xs
        s = s * jnp.exp(dt * a) + dt * jnp.outer(x, b)
        return s, s @ c

    s, out = jax.lax.scan(token, s, (x, dt, b, c))
    return out, s


def gdn_inputs(t=37, h=2, dk=6, dv=5):
    n = lambda *s: jnp.asarray(RNG.normal(size=s))  # noqa: E731
    q, k = n(t, h, dk), n(t, h, dk)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # as the layer feeds it
    g = -jnp.abs(n(t, h)) * 0.3
    beta = jax.nn.sigmoid(n(t, h))
    return q, k, n(t, h, dv), g, beta, n(h, dk, dv) * 0.1


def ssd_inputs(t=37, h=2, p=4, n_=3):
    n = lambda *s: jnp.asarray(RNG.normal(size=s))  # noqa: E731
    dt = jax.nn.softplus(n(t, h))
    a = -jnp.abs(n(h)) - 0.1
    return n(t, h, p), dt, a, n(t, n_), n(t, n_), n(h, p, n_) * 0.1


def per_head_loop(loop, args, heads_axis_of):
    """Run a one-head loop over each head and stack as the chunked form lays it out."""
    outs, states = [], []
    for i in range(args[0].shape[1]):
        o, s = loop(*(heads_axis_of(j, a, i) for j, a in enumerate(args)))
        outs.append(o)
        states.append(s)
    return jnp.stack(outs, 1), jnp.stack(states)


def same_as_loop(chunked, loop, args, s0, pick):
    """The chunked form's outputs, final state and gradients (of a loss of both, with
    respect to every input) equal the one-head loop's, run head by head."""
    looped = lambda *xs: per_head_loop(loop, (*xs, s0), pick)  # noqa: E731
    for got, want in zip(chunked(*args), looped(*args), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-10)

    def loss(fn):
        return lambda *xs: jnp.sum(jnp.sin(fn(*xs)[0])) + jnp.sum(fn(*xs)[1] ** 2)

    every = tuple(range(len(args)))
    got = jax.jit(jax.grad(loss(chunked), argnums=every))(*args)
    want = jax.jit(jax.grad(loss(looped), argnums=every))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-9)


@pytest.mark.parametrize("chunk", [5, 16])  # 37 tokens: 8 chunks or 3, the last padded
def test_gated_delta_chunked_equals_the_recurrence(chunk):
    with jax.enable_x64(True):
        *args, s0 = gdn_inputs()
        chunked = lambda *xs: gated_delta_chunked(*xs, chunk, s0)  # noqa: E731
        pick = lambda j, a, i: a[i] if j == 5 else a[:, i]  # noqa: E731  state: head axis 0
        same_as_loop(chunked, gated_delta_loop, args, s0, pick)


@pytest.mark.parametrize("chunk", [5, 16])
def test_ssd_chunked_equals_the_recurrence(chunk):
    with jax.enable_x64(True):
        *args, s0 = ssd_inputs()
        chunked = lambda *xs: ssd_chunked(*xs, chunk, s0)  # noqa: E731

        def pick(j, arr, i):  # x, dt: head axis 1; a, state: 0; B, C: shared
            return arr[:, i] if j in (0, 1) else arr[i] if j in (2, 5) else arr

        same_as_loop(chunked, ssd_loop, args, s0, pick)


@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba2"])
def test_chunk_size_does_not_change_the_layer(mixer):
    cfg = load_config("pico", [f"model.mixer={mixer}"])
    graphdef, state = nnx.split(create_model(cfg.model).prefix.rnn)  # stacked layers
    first = jax.tree.map(lambda a: a[0], state)
    x = jnp.asarray(RNG.normal(size=(2, 50, cfg.model.width)), jnp.float32)
    run = jax.jit(lambda st, x, c: nnx.merge(graphdef, st)(x, None, chunk=c)[0], static_argnums=2)
    outs = [run(first, x, c) for c in (8, 20, 64)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=2e-5)


def test_hybrid_attends_fully_in_every_kth_layer():
    """The hybrid equals its blocks applied one by one with the window, except the
    flagged layers, which attend to every key; with full_every=1 it is full attention."""
    cfg = load_config("pico", ["model.mixer=hybrid", "model.window=8", "model.full_every=2"])
    model = create_model(cfg.model, seed=2)
    tokens = jnp.asarray(RNG.integers(0, 256, (1, 40)), jnp.int32)
    got = plain_hidden(model, tokens)
    graphdef, state = nnx.split(model.prefix)
    x, pos = model.embed_tokens(tokens), jnp.arange(40)
    block = jax.jit(lambda st, x, w: nnx.merge(graphdef, st)(x, pos, w)[0], static_argnums=2)
    for i in range(cfg.model.layers):
        x = block(jax.tree.map(lambda a, i=i: a[i], state), x, None if (i + 1) % 2 == 0 else 8)
    np.testing.assert_allclose(got, x, atol=1e-5)

    every = load_config("pico", ["model.mixer=hybrid", "model.window=8", "model.full_every=1"])
    full = load_config("pico", ["model.mixer=full"])
    a = plain_hidden(create_model(every.model, seed=2), tokens)
    b = plain_hidden(create_model(full.model, seed=2), tokens)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("preset", ["pico", "nano", "125m", "1b"])
@pytest.mark.parametrize(
    "mixer", ["full", "swa", "hybrid", "gated_deltanet", "mamba2", "ttt_kvb", "ttt_e2e"]
)
def test_parameter_formula_is_the_built_model_and_baselines_match(mixer, preset):
    import math

    cfg = load_config(preset, [f"model.mixer={mixer}"])
    built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(cfg.model))))
    assert model_params(cfg.model) == built
    if mixer != "ttt_e2e":  # whose smaller MLP is each preset's own choice (the paper's)
        full = model_params(load_config(preset, ["model.mixer=full"]).model)
        assert abs(built / full - 1) < 0.015, (built, full)  # matched as the paper matches


def test_bad_mixer_settings_are_one_line():
    with pytest.raises(ConfigError, match="model.full_every=9: must be between 1 and"):
        load_config("pico", ["model.mixer=hybrid", "model.full_every=9"])
    with pytest.raises(ConfigError, match="model.ssm_state=0"):
        load_config("pico", ["model.mixer=mamba2", "model.ssm_state=0"])
    with pytest.raises(ConfigError, match="model.mixer='mamba'"):
        load_config("pico", ["model.mixer=mamba"])


def test_flops_count_each_layers_span_and_a_recurrence_flat_in_context():
    from ttt.train.flops import flops_per_token, mean_keys

    def flops(mixer, t, *o):
        cfg = load_config("nano", [f"model.mixer={mixer}", f"data.seq_len={t}", *o])
        return flops_per_token(cfg, training=True, inner=False), cfg

    swa, cfg = flops("swa", 4096)
    hybrid, _ = flops("hybrid", 4096)
    # one of nano's six layers attends fully: 3 x 4 d x (its extra keys) more per token
    extra = mean_keys(4096, None) - mean_keys(4096, cfg.model.window)
    assert hybrid - swa == pytest.approx(3 * 4 * cfg.model.width * extra)
    for mixer in ("gated_deltanet", "mamba2"):
        assert flops(mixer, 256)[0] == flops(mixer, 65536)[0] > 0
