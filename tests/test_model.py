"""Numerical equivalences the model relies on (DESIGN.md, "The model")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch
from flax import nnx

from ttt.model import create_model, loss_fn
from ttt.model.layers import Attention
from ttt.model.loop import carry_window, plain_nll, token_nll


@pytest.mark.parametrize("window,chunk", [(24, 16), (16, 16), (8, 16), (40, 8)])
def test_chunked_swa_with_carried_window_equals_whole_sequence(pico, window, chunk):
    cfg = pico(f"model.window={window}")
    attn = Attention(cfg.model, jnp.float32, nnx.Rngs(0))
    seq_len = 64
    x = jax.random.normal(jax.random.key(1), (seq_len, cfg.model.width))
    pos = jnp.arange(seq_len)
    whole, _ = attn(x, pos, window)

    heads, hd = attn.heads, attn.head_dim
    ck = cv = jnp.zeros((window, heads, hd))
    cpos = jnp.arange(-window, 0)
    outs = []
    for start in range(0, seq_len, chunk):
        sl = slice(start, start + chunk)
        out, (k, v) = attn(x[sl], pos[sl], window, (ck, cv, cpos))
        outs.append(out)
        ck, cv, cpos = (
            carry_window(ck, k, 0),
            carry_window(cv, v, 0),
            carry_window(cpos, pos[sl], 0),
        )
    np.testing.assert_allclose(jnp.concatenate(outs), whole, atol=1e-5, rtol=1e-5)

    # The window matters: dropping the carried keys changes the later chunks.
    alone, _ = attn(x[chunk : 2 * chunk], pos[chunk : 2 * chunk], window)
    assert not np.allclose(alone, whole[chunk : 2 * chunk], atol=1e-4)


def _nll(cfg, params_from=None, *, inner, inner_lr=1.0, batch=None):
    model = create_model(cfg.model, seed=0)
    graphdef, params = nnx.split(model)
    if params_from is not None:
        params = params_from
    batch = batch or random_batch(jax.random.key(0), 2, cfg.data.seq_len)
    f = jax.jit(lambda p, b, lr: loss_fn(graphdef, p, b, lr, cfg.ttt, inner=inner))
    loss, nll = f(params, batch, jnp.float32(inner_lr))
    return loss, nll, params


def test_full_equals_swa_when_window_covers_sequence(pico):
    _, full, p_full = _nll(pico(mixer="full"), inner=False)
    _, swa, p_swa = _nll(pico("model.window=64", mixer="swa"), inner=False)
    jax.tree.map(np.testing.assert_array_equal, p_full, p_swa)  # same weights
    np.testing.assert_allclose(full, swa, atol=1e-6)
    _, narrow, _ = _nll(pico("model.window=8", mixer="swa"), inner=False)
    assert not np.allclose(full, narrow, atol=1e-3)


def test_inner_lr_zero_equals_no_inner_updates(pico):
    cfg = pico()
    _, plain, params = _nll(cfg, inner=False)
    _, zero, _ = _nll(cfg, params, inner=True, inner_lr=0.0)
    np.testing.assert_allclose(zero, plain, atol=1e-5)
    # With a real inner LR the first chunk is still identical (it is predicted before any
    # update), and later chunks are not.
    _, learned, _ = _nll(cfg, params, inner=True, inner_lr=1.0)
    chunk = cfg.ttt.chunk
    np.testing.assert_allclose(learned[:, :chunk], plain[:, :chunk], atol=1e-5)
    assert np.abs(learned[:, chunk:] - plain[:, chunk:]).max() > 1e-3


@pytest.mark.parametrize("mixer", ["full", "swa", "ttt_e2e"])
def test_causality(pico, mixer):
    cfg = pico(mixer=mixer)
    inputs, targets, mask = random_batch(jax.random.key(3), 1, cfg.data.seq_len)
    t = 2 * cfg.ttt.chunk + 5  # mid-chunk: earlier tokens of its own chunk must not move
    changed = inputs.at[:, t].set((inputs[:, t] + 7) % 256)
    inner = mixer == "ttt_e2e"
    _, a, params = _nll(cfg, inner=inner, batch=(inputs, targets, mask))
    _, b, _ = _nll(cfg, params, inner=inner, batch=(changed, targets, mask))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4


def test_token_nll_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-6)


def test_plain_nll_shapes(pico):
    cfg = pico()
    model = create_model(cfg.model)
    logits = plain_nll(model, jnp.zeros((2, 64), jnp.int32))
    assert logits.shape == (2, 64, cfg.model.vocab_size)
