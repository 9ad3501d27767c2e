import os

# Tests run on the CPU of a 2-core machine; keep XLA from grabbing every thread pool.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from ttt.config import load_config  # noqa: E402


def random_batch(key, batch: int, seq_len: int, vocab: int = 256):
    tokens = jax.random.randint(key, (batch, seq_len + 1), 0, vocab)
    return tokens[:, :-1], tokens[:, 1:], jnp.ones((batch, seq_len), bool)


@pytest.fixture
def pico():
    """A pico config small enough that second-order gradients compile in seconds."""

    def make(*overrides, mixer="ttt_e2e"):
        base = ["data.seq_len=64", "ttt.chunk=16", "model.window=24", f"model.mixer={mixer}"]
        return load_config("pico", [*base, *overrides])

    return make
