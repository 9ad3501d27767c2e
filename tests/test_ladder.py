"""Table 1's ladder (docs/ladder.md): TTT-KVB's chunked layer against a token loop whose
gradient is written out by hand here, its meta-gradient against finite differences,
causality for every rung, and the "all layers, multi-head" rung with one head and the
last quarter updated against today's ttt_e2e."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch
from flax import nnx

from ttt.config import ConfigError, load_config
from ttt.model import create_model, loss_fn
from ttt.model.kvb import kvb_chunked, row_norms
from ttt.model.loop import sequence_nll
from ttt.model.transformer import abstract_model
from ttt.shapes import model_params

RNG = np.random.default_rng(0)

# Each rung as overrides of pico (docs/ladder.md; sweeps/table1_ladder.yaml at 760M).
RUNGS = {
    "swa": ["model.mixer=swa"],
    "ttt_kvb": ["model.mixer=ttt_kvb"],
    "ttt_kvb_simplified_output": ["model.mixer=ttt_kvb", "model.kvb_output=key"],
    "ttt_e2e_all_layers_multihead": [
        "model.mixer=ttt_e2e",
        "model.ttt_layers=4",
        "model.fast_heads=4",
    ],
    "ttt_e2e": ["model.mixer=ttt_e2e"],
}


def silu(z):
    return z / (1 + np.exp(-z))


def dsilu(z):
    s = 1 / (1 + np.exp(-z))
    return s * (1 + z * (1 - s))


def token_loop(w, q, k, v, lr, chunk, loss, output):
    """One head, one token at a time, in numpy: the output from the weights of the last
    completed chunk; at each chunk's end, the binding loss's gradient by hand
    (backpropagation through the SwiGLU), a step, and each row back to its first norm."""
    w = {n: np.array(a) for n, a in w.items()}
    norms = {n: np.linalg.norm(a, axis=0, keepdims=True) for n, a in w.items()}
    grads = {n: np.zeros_like(a) for n, a in w.items()}
    out = []
    for t in range(len(q)):
        x_out = k[t] if output == "key" else q[t]
        out.append((silu(x_out @ w["w1"]) * (x_out @ w["w3"])) @ w["w2"])
        h1, h3 = k[t] @ w["w1"], k[t] @ w["w3"]
        a = silu(h1) * h3
        y = a @ w["w2"]
        dy = lr[t] * (2 * (y - v[t]) if loss == "mse" else -v[t])
        da = w["w2"] @ dy
        grads["w2"] += np.outer(a, dy)
        grads["w3"] += np.outer(k[t], da * silu(h1))
        grads["w1"] += np.outer(k[t], da * h3 * dsilu(h1))
        if (t + 1) % chunk == 0 or t == len(q) - 1:
            for n in w:
                step = w[n] - grads[n]
                w[n] = step / np.linalg.norm(step, axis=0, keepdims=True) * norms[n]
                grads[n][:] = 0
    return np.stack(out), w


@pytest.mark.parametrize("chunk", [5, 16])  # 37 tokens: 8 chunks or 3, the last padded
@pytest.mark.parametrize("loss", ["mse", "dot"])
@pytest.mark.parametrize("output", ["query", "key"])
def test_kvb_chunked_equals_a_token_loop(chunk, loss, output):
    t, h, d, f = 37, 2, 6, 7
    n = lambda *s: RNG.normal(size=s)  # noqa: E731
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k, v = unit(n(t, h, d)), unit(n(t, h, d)), n(t, h, d)
    lr = 0.05 * np.abs(n(t, h))
    w = {"w1": n(h, d, f) / 3, "w3": n(h, d, f) / 3, "w2": n(h, f, d) / 3}
    with jax.enable_x64(True):
        j = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731
        wj = jax.tree.map(j, w)
        z, w_end = kvb_chunked(wj, j(q), j(k), j(v), j(lr), chunk, loss, output, row_norms(wj))
        z, w_end = np.asarray(z), jax.tree.map(np.asarray, w_end)
    for head in range(h):
        want, w_want = token_loop(
            {n_: a[head] for n_, a in w.items()},
            q[:, head], k[:, head], v[:, head], lr[:, head], chunk, loss, output,
        )  # fmt: skip
        np.testing.assert_allclose(z[:, head], want, atol=1e-10)
        for name in w:
            np.testing.assert_allclose(w_end[name][head], w_want[name], atol=1e-10)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree[...]


def _add(params, path, delta):
    params = jax.tree.map(lambda x: x, params)
    node = params
    for key in path:
        node = node[key]
    node.set_value(node[...] + delta)
    return params


def test_kvb_meta_gradient_matches_finite_differences(pico):
    """The outer gradient through the layer-local updates, for the initial fast weights,
    the LR projection and the shared key projection."""
    with jax.enable_x64(True):
        cfg = pico(
            "model.param_dtype=float64",
            "model.compute_dtype=float64",
            "data.seq_len=48",
            "model.window=8",
            "model.kvb_lr=0.5",  # large enough that the updates matter
            mixer="ttt_kvb",
        )
        graphdef, params = nnx.split(create_model(cfg.model, seed=0))
        batch = random_batch(jax.random.key(0), 2, cfg.data.seq_len)
        f = jax.jit(lambda p: loss_fn(graphdef, p, batch, 0.0, cfg.ttt, inner=False)[0])
        grad = jax.jit(jax.grad(f))(params)
        for path in [
            ("prefix", "attn", "w1"),
            ("prefix", "attn", "w2"),
            ("prefix", "attn", "w_lr"),
            ("prefix", "attn", "wk"),
        ]:
            leaf = _get(params, path)
            u = jax.random.normal(jax.random.key(len(path[-1])), leaf.shape, jnp.float64)
            eps = 1e-6  # the loss curves strongly in wk: at 1e-5 truncation alone is 1e-5
            fd = (f(_add(params, path, eps * u)) - f(_add(params, path, -eps * u))) / (2 * eps)
            analytic = float(jnp.vdot(_get(grad, path), u))
            assert abs(analytic - float(fd)) <= 1e-6 * abs(float(fd)), (path, analytic, fd)


def rung_nll(cfg, model, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    inner = cfg.model.mixer == "ttt_e2e"
    batch = (inputs, targets, jnp.ones(targets.shape, bool))
    return sequence_nll(model, batch, jnp.float32(1.0), cfg.ttt, inner=inner)[1]


# Fig 1's other baselines, whose causality the same test holds
BASELINES = {m: [f"model.mixer={m}"] for m in ("full", "hybrid", "gated_deltanet", "mamba2")}


@pytest.mark.parametrize("rung", [*RUNGS, *BASELINES])
def test_causality_of_every_rung_and_mixer(rung):
    """Perturbing token t changes no output before t, and changes some after."""
    overrides = RUNGS.get(rung) or BASELINES[rung]
    cfg = load_config("pico", [*overrides, "model.window=16", "data.seq_len=80"])
    model = create_model(cfg.model, seed=1)
    tokens = RNG.integers(0, 256, (1, 81)).astype(np.int32)
    other = tokens.copy()
    other[0, 50] = (other[0, 50] + 1) % 256
    a, b = (rung_nll(cfg, model, jnp.asarray(t))[0] for t in (tokens, other))
    np.testing.assert_array_equal(a[:49], b[:49])  # target 49 is token 50
    assert np.abs(np.asarray(a[50:] - b[50:])).max() > 0


def test_multihead_rung_with_one_head_is_ttt_e2e():
    """`fast_heads=1` runs the prime MLP as a per-head SwiGLU of one head; on the same
    weights it gives today's ttt_e2e loss, per-token NLL and meta-gradient."""
    base = ["model.mixer=ttt_e2e", "model.mlp=160", "data.seq_len=64", "ttt.chunk=16"]
    e2e = load_config("pico", base)
    one = load_config("pico", [*base, "model.fast_heads=1"])
    assert e2e.model.ttt_layers == e2e.model.layers // 4  # the last quarter
    graphdef, params = nnx.split(create_model(e2e.model, seed=3))
    graphdef1, params1 = nnx.split(create_model(one.model, seed=4))
    prime = params["suffix"]["prime_mlp"]
    for name in ("w1", "w2", "w3"):  # (layers, d, f) -> (layers, 1 head, d, f)
        params1["suffix"]["prime_mlp"][name].set_value(prime[name][...][:, None])
    flat, flat1 = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(params1))
    for path, var in flat.items():
        if "prime_mlp" not in path:
            flat1[path].set_value(var[...])
    batch = random_batch(jax.random.key(1), 2, 64)

    def run(g, p):
        f = lambda p: loss_fn(g, p, batch, jnp.float32(1.0), e2e.ttt, inner=True)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))(p)

    (loss, nll), grad = run(graphdef, params)
    (loss1, nll1), grad1 = run(graphdef1, params1)
    np.testing.assert_allclose(loss1, loss, rtol=1e-6)
    np.testing.assert_allclose(nll1, nll, atol=2e-5)
    g, g1 = dict(nnx.to_flat_state(grad)), dict(nnx.to_flat_state(grad1))
    for path, var in g.items():
        want = var[...][:, None] if "prime_mlp" in path else var[...]
        np.testing.assert_allclose(g1[path][...], want, atol=1e-5, rtol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("preset", ["pico", "nano", "760m"])
def test_every_rung_has_full_attentions_parameters(preset):
    """The formula is the built model, and each rung is within 1.5% of `full`, as the
    paper keeps the count across rungs (ttt_e2e: within its preset's own choice)."""
    full = model_params(load_config(preset, ["model.mixer=full"]).model)
    m = load_config(preset).model
    for rung, overrides in RUNGS.items():
        if rung == "ttt_e2e_all_layers_multihead":  # every layer, the attention's heads
            overrides = [*overrides, f"model.ttt_layers={m.layers}", f"model.fast_heads={m.heads}"]
        cfg = load_config(preset, overrides)
        built = sum(
            math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_model(cfg.model)))
        )
        assert model_params(cfg.model) == built, rung
        if rung != "ttt_e2e":  # whose smaller MLP is each preset's own (the paper's) choice
            assert abs(built / full - 1) < 0.015, (rung, built, full)


def test_bad_ladder_settings_are_one_line():
    cases = {
        "model.kvb_loss='l1': allowed are mse, dot": ["model.mixer=ttt_kvb", "model.kvb_loss=l1"],
        "model.kvb_output='value'": ["model.mixer=ttt_kvb", "model.kvb_output=value"],
        "model.kvb_lr=0.0: must be > 0": ["model.mixer=ttt_kvb", "model.kvb_lr=0"],
        "model.fast_heads=3: must divide model.width=64": ["model.fast_heads=3"],
        "model.fast_heads=2: needs model.mixer=ttt_e2e": ["model.mixer=swa", "model.fast_heads=2"],
    }
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config("pico", overrides)
