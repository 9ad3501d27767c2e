"""Numerical equivalences the model relies on (docs/design.md, "The model's math")."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch
from flax import nnx

from ttt.model import create_model
from ttt.model.check import chunked_and_whole
from ttt.model.check import model_nll as _nll
from ttt.model.layers import Attention
from ttt.model.loop import cache_plan, hidden_nll, plain_hidden, token_nll


@pytest.mark.parametrize("window,chunk", [(24, 16), (16, 16), (8, 16), (40, 8)])
def test_chunked_swa_with_carried_window_equals_whole_sequence(pico, window, chunk):
    cfg = pico(f"model.window={window}")
    attn = Attention(cfg.model, jnp.float32, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (64, cfg.model.width))
    chunked, whole = chunked_and_whole(attn, x, window, chunk)
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=1e-5)

    pos = jnp.arange(64)
    # The window matters: dropping the carried keys changes the later chunks.
    alone, _ = attn(x[chunk : 2 * chunk], pos[chunk : 2 * chunk], window)
    assert not np.allclose(alone, whole[chunk : 2 * chunk], atol=1e-4)


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


@pytest.mark.parametrize("n_chunks,chunk,cache_len", [(8, 16, 64), (8, 1024, 7168), (32, 4, 16)])
def test_cache_plan_covers_every_chunk(n_chunks, chunk, cache_len):
    scored = []
    for phases in (1, 2, 3, 8):
        plan = cache_plan(n_chunks, chunk, cache_len, phases)
        assert len(plan) <= phases and sum(n for n, _ in plan) == n_chunks
        end = 0
        for n, size in plan:  # enough for its own chunks and for the next run's first
            end += n
            assert size == min(end * chunk, cache_len)
        scored.append(sum(n * (size + chunk) for n, size in plan))
    assert cache_plan(n_chunks, chunk, cache_len, 1) == [(n_chunks, cache_len)]
    assert scored == sorted(scored, reverse=True) and scored[-1] < scored[0]


def test_cache_phases_give_the_same_function(pico):
    """Running the chunk loop as several scans with growing caches is the same function
    as one scan with a window-sized cache (so its outer gradient is the same too)."""
    batch = random_batch(jax.random.key(0), 2, 64)
    nll = {}
    for phases in (1, 3):  # 3: [(1, 16), (1, 32), (2, 48)], a cache that grows twice
        cfg = pico("model.window=48", f"ttt.cache_phases={phases}")
        _, nll[phases], _ = _nll(cfg, inner=True, batch=batch)
    np.testing.assert_allclose(nll[3], nll[1], atol=1e-5)


def test_chunk_attention_kernels_agree(pico):
    """On first-order paths the chunks attend through jax's fused attention with an
    explicit mask (XLA here, cuDNN on a GPU): the same test-time-trained NLL as the dense
    form, empty cache slots included (3 phases: caches of 16, 32 and 48 slots)."""
    batch = random_batch(jax.random.key(0), 2, 64)
    nll = {}
    for kernel in ("dense", "xla"):
        cfg = pico("model.window=48", "ttt.cache_phases=3", f"ttt.chunk_attention={kernel}")
        _, nll[kernel], _ = _nll(cfg, inner=True, batch=batch, first_order=True)
    np.testing.assert_allclose(nll["xla"], nll["dense"], atol=1e-5)


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


def test_plain_hidden_shapes(pico):
    cfg = pico()
    model = create_model(cfg.model)
    hidden = plain_hidden(model, jnp.zeros((2, 64), jnp.int32))
    assert hidden.shape == (2, 64, cfg.model.width)
    assert model.logits(hidden).shape == (2, 64, cfg.model.vocab_size)


@pytest.mark.parametrize("block", [10**9, 258 * 32, 258 * 20])
def test_blocked_nll_equals_whole_logits_with_gradients(pico, block):
    """Blocked, recomputed logits give the same NLL and the same gradients (1, 4 and 8
    blocks of positions; 20 tokens' worth rounds up to a divisor of T)."""
    model = create_model(pico().model)
    graphdef, params = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (2, 64, model.cfg.width))
    targets = jax.random.randint(jax.random.key(1), (2, 64), 0, model.cfg.vocab_size)

    def total(p, x, fn):
        m = nnx.merge(graphdef, p)
        return jnp.sum(fn(m, x) * jnp.linspace(0.5, 1.5, 64))

    whole = lambda m, x: token_nll(m.logits(x), targets)  # noqa: E731
    blocked = lambda m, x: hidden_nll(m, x, targets, block=block)  # noqa: E731
    np.testing.assert_allclose(blocked(model, x), whole(model, x), rtol=1e-6, atol=1e-6)
    g_whole = jax.grad(total, argnums=(0, 1))(params, x, whole)
    g_blocked = jax.grad(total, argnums=(0, 1))(params, x, blocked)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_whole, g_blocked
    )


@pytest.mark.parametrize("window", [None, 1, 8, 64])
def test_sequence_attention_kernels_agree(window):
    """jax.nn.dot_product_attention's XLA path with our (window - 1, 0) local window gives
    the dense masked softmax; the cuDNN kernel takes the same arguments (GPU check)."""
    from ttt.model.layers import attend_sequence

    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 48, 4, 8))
    dense = attend_sequence(q, k, v, window, "dense")
    xla = attend_sequence(q, k, v, window, "xla")
    np.testing.assert_allclose(xla, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len,window", [(48, 8), (50, 8), (33, 1), (100, 30)])
def test_banded_swa_equals_the_whole_score_matrix(seq_len, window):
    """Sliding-window attention in window-sized blocks (each over its own and the previous
    block's keys) is the (T x T) masked softmax, in values and gradients, also when T is
    not a multiple of the window; `dense` switches to it for windows under about T/2."""
    from ttt.model.layers import attend, attend_banded, attend_sequence, banded_pays

    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, seq_len, 4, 8))
    pos = jnp.arange(seq_len)

    @functools.partial(jax.jit, static_argnums=0)
    def with_grads(kind, q, k, v):  # jitted: op by op, the gradients take seconds
        fn = {
            "whole": lambda q, k, v: attend(q, k, v, pos, pos, window),
            "banded": lambda q, k, v: attend_banded(q, k, v, window),
            "dense": lambda q, k, v: attend_sequence(q, k, v, window, "dense"),
        }[kind]
        out = fn(q, k, v)
        return out, jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)

    banded, whole = with_grads("banded", q, k, v), with_grads("whole", q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), banded, whole)
    assert banded_pays(seq_len, window)
    np.testing.assert_array_equal(with_grads("dense", q, k, v)[0], banded[0])
    assert not banded_pays(64, 32) and not banded_pays(64, None)


@pytest.mark.parametrize(
    "field,mixer", [("model.attention", "full"), ("ttt.chunk_attention", "ttt_e2e")]
)
def test_cudnn_attention_off_the_gpu_is_one_line(capsys, field, mixer):
    from ttt.cli.app import main

    args = ["bench", "prefill", "pico", f"{field}=cudnn", "--mixers", mixer, "--steps", "1"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {field}='cudnn': needs a GPU")


def test_inner_telemetry_agrees_with_the_loop():
    """Telemetry's loss before each step is the loop's chunk loss, the next chunk's loss
    after the step is that chunk's own loss before its step, and with a zero inner LR no
    step changes anything."""
    from ttt.config import load_config
    from ttt.model.loop import inner_loop_nll, masked_mean
    from ttt.model.telemetry import inner_telemetry

    cfg = load_config("pico", ["model.window=24", "ttt.chunk=16", "model.ttt_layers=2"])
    model = create_model(cfg.model, seed=3)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 65)), jnp.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = targets != 7
    lr = jnp.float32(1.0)
    tel = inner_telemetry(model, inputs, targets, mask, lr, cfg.ttt)
    nll, _ = inner_loop_nll(model, inputs, targets, mask, lr, cfg.ttt)
    chunks = [
        [masked_mean(nll[b, i : i + 16], mask[b, i : i + 16]) for i in range(0, 64, 16)]
        for b in range(2)
    ]
    np.testing.assert_allclose(tel["loss_before"], np.array(chunks), atol=2e-5)
    np.testing.assert_allclose(tel["next_after"][:, :-1], tel["loss_before"][:, 1:], atol=2e-5)
    assert np.isnan(tel["next_after"][:, -1]).all()
    assert tel["grad_norm"].shape == (2, 4, 2)  # sequences, chunks, TTT layers
    clipped = np.sqrt((np.asarray(tel["clipped_grad_norm"]) ** 2).sum(-1))
    assert (clipped <= cfg.ttt.inner_clip + 1e-5).all()
    assert (np.asarray(tel["loss_after"]) < np.asarray(tel["loss_before"])).mean() > 0.5

    off = inner_telemetry(model, inputs, targets, mask, jnp.float32(0.0), cfg.ttt)
    np.testing.assert_allclose(off["loss_after"], off["loss_before"], atol=1e-6)
    np.testing.assert_allclose(off["update_rel"], 0.0, atol=0)
