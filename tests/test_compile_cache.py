"""The executable cache: a trial that differs only in learning rates skips tracing and
compiling, and runs exactly what a fresh compile would."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch
from flax import nnx

from ttt import compile_cache
from ttt.model import create_model
from ttt.train.optim import hyper
from ttt.train.step import init_opt_state, make_train_step

# Compiles and fresh processes: the full tier (`make test`), not `make test-fast`.
pytestmark = pytest.mark.slow


class NoTracing:
    def lower(self, *args):
        raise AssertionError("traced although the executable was stored")


def _args(cfg):
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
    batch = random_batch(jax.random.key(0), 4, cfg.data.seq_len)
    return graphdef, (params, init_opt_state(cfg, params), batch, hyper(cfg, 3))


def test_lr_only_change_loads_the_stored_executable(pico, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_active", tmp_path)
    cfg = pico("ttt.chunk=32", "model.layers=2")  # the second-order step, compiled small
    graphdef, args = _args(cfg)
    fresh = compile_cache.compiled("train", cfg, make_train_step(cfg, graphdef), args)
    assert len(list((tmp_path / "executables").glob("train-*.bin"))) == 1

    # Another trial's rates are inputs of the same program: loaded, it runs as compiled.
    lr_only = cfg.replace(**{"train.lr": 1e-2, "ttt.inner_lr": 0.3, "ttt.inner_lr_init": 0.3})
    _, args = _args(lr_only)
    loaded = compile_cache.compiled("train", lr_only, NoTracing(), args)
    _, fresh_args = _args(lr_only)
    got, want = loaded(*args), fresh(*fresh_args)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)
    assert float(got[2]["lr"]) != float(hyper(cfg, 3).lr)  # the new rates were used

    # A shape change is another program: it is traced and compiled, not loaded.
    other = cfg.replace(**{"model.window": 32})
    _, args = _args(other)
    with pytest.raises(AssertionError, match="traced although"):
        compile_cache.compiled("train", other, NoTracing(), args)


def test_unreadable_entry_is_recompiled(pico, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_active", tmp_path)
    cfg = pico(mixer="full")
    graphdef, args = _args(cfg)
    key = compile_cache.executable_key("train", cfg, args)
    (tmp_path / "executables").mkdir()
    (tmp_path / "executables" / f"train-{key}.bin").write_bytes(b"not a pickle")
    program = compile_cache.compiled("train", cfg, make_train_step(cfg, graphdef), args)
    assert jnp.isfinite(program(*args)[2]["loss"])


def test_a_new_process_loads_and_runs_the_stored_step(tmp_path):
    """What a second trial does: a fresh process loads the step a first one stored, and
    runs it to the same loss (the first process compiled it from scratch)."""
    script = """
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from ttt import compile_cache
from ttt.config import load_config
from ttt.model import create_model
from ttt.train.optim import hyper
from ttt.train.step import init_opt_state, make_train_step
compile_cache.enable(sys.argv[1])
cfg = load_config("pico", ["model.mixer=swa", "data.seq_len=64", "model.window=24"])
graphdef, params = nnx.split(create_model(cfg.model))
tokens = jax.random.randint(jax.random.key(0), (4, 65), 0, 256)
batch = tokens[:, :-1], tokens[:, 1:], jnp.ones((4, 64), bool)
step = compile_cache.CachedStep("train", cfg, make_train_step(cfg, graphdef))
print(json.dumps(float(step(params, init_opt_state(cfg, params), batch, hyper(cfg, 0))[2]["loss"])))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("TTT_COMPILE_CACHE", None)

    def once():
        r = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.strip().splitlines()[-1])

    first = once()
    assert len(list((tmp_path / "executables").glob("train-*.bin"))) == 1
    assert once() == first
    # Same key in the new process: it loaded that file rather than storing another.
    assert len(list((tmp_path / "executables").glob("train-*.bin"))) == 1


def test_a_second_decoder_loads_its_programs_and_inner_lr_is_part_of_their_key(
    pico, tmp_path, monkeypatch
):
    """`ttt generate` twice on one run compiles once; the decoder bakes ttt.inner_lr in as
    a constant, so another inner LR is another program, never the stored one."""
    from ttt.model.decode import Decoder, generate

    monkeypatch.setattr(compile_cache, "_active", tmp_path)
    cfg = pico("model.layers=2")
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
    prompt = list(range(1, 40))
    first = generate(Decoder(cfg, graphdef, 64, 256), params, prompt, 8)
    assert {p.name.split("-")[1] for p in (tmp_path / "executables").glob("decode-*")} == {
        "feed",
        "prefill",
    }
    dec = Decoder(cfg, graphdef, 64, 256)
    for step in (dec._feed, dec._prefill):
        step.jitted = NoTracing()
    again = generate(dec, params, prompt, 8)
    assert again.tokens == first.tokens
    other = Decoder(cfg.replace(**{"ttt.inner_lr": 0.5}), graphdef, 64, 256)
    other._feed.jitted = NoTracing()
    with pytest.raises(AssertionError, match="traced although"):
        generate(other, params, prompt, 8)
