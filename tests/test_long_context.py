"""Evaluation memory at long context: nothing of size T x T or T x vocab is kept, so the
compiled evaluation's scratch memory grows linearly with the context length T (what lets
`ttt eval --seq-len 131072` fit on one GPU). Measured from XLA's own memory analysis of
the compiled program, on CPU."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ttt.config import load_config
from ttt.model import create_model
from ttt.model.loop import hidden_nll
from ttt.train.step import make_eval_step

pytestmark = pytest.mark.slow


def eval_scratch_bytes(mixer: str, seq_len: int) -> int:
    cfg = load_config(
        "pico",
        [f"model.mixer={mixer}", f"data.seq_len={seq_len}", "data.batch_size=1"]
        + ["ttt.chunk=64", "model.window=128"],
    )
    graphdef, params = nnx.split(create_model(cfg.model))
    ids = jnp.zeros((1, seq_len), jnp.int32)
    batch = (ids, ids, jnp.ones((1, seq_len), bool))
    step = make_eval_step(cfg, graphdef).lower(params, batch, jnp.float32(1.0)).compile()
    return step.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mixer", ["swa", "ttt_e2e"])
def test_eval_memory_is_linear_in_context(mixer):
    small, large = eval_scratch_bytes(mixer, 1024), eval_scratch_bytes(mixer, 4096)
    assert large / small < 4.5  # 4x the tokens: 4x the memory, not 16x


def test_full_attention_is_the_quadratic_control():
    """The measure sees a T x T score matrix where there is one (full attention, dense
    on CPU; cuDNN's fused kernel avoids it on GPU)."""
    small, large = eval_scratch_bytes("full", 512), eval_scratch_bytes("full", 2048)
    assert large / small > 10


def test_logits_are_never_whole():
    """The NLL of T positions over the vocabulary holds one block of logits at a time."""
    model = create_model(load_config("pico").model)
    seq_len, vocab = 4096, model.cfg.vocab_size
    x = jnp.zeros((1, seq_len, model.cfg.width))
    targets = jnp.zeros((1, seq_len), jnp.int32)

    def scratch(block):
        fn = jax.jit(lambda x, t: hidden_nll(model, x, t, block=block))
        return fn.lower(x, targets).compile().memory_analysis().temp_size_in_bytes

    whole = seq_len * vocab * 4  # fp32 logits of every position
    assert scratch(10**9) >= whole  # one block: the whole logits
    # blocks of 64 positions: the hidden states regrouped by block (T x d), and logits
    # of a few blocks at most
    assert scratch(vocab * 64) < x.size * 4 + 4 * 64 * vocab * 4
