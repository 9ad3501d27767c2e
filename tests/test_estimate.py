"""The pre-run estimate (`ttt.estimate`): its memory held to XLA's own memory analysis of
the compiled train step, its time to the measurements it is built from."""

from __future__ import annotations

import pytest

from ttt.bench import train_step_bytes
from ttt.config import load_config
from ttt.estimate import ACCELERATORS, micro_batch, train_memory
from ttt.estimate.speed import REFERENCE, rate

# The estimate against XLA's figure (`ttt.bench.compiled_bytes`: arguments + outputs -
# aliased + temporaries) on this machine's CPU, in fp32: within this fraction either way.
# BENCHMARKS.md ("Memory estimate against XLA") has the measured agreement.
TOLERANCE = 0.20
CASES = [
    ("pico", "full", "none"),
    ("pico", "full", "block"),
    ("pico", "ttt_e2e", "none"),
    ("pico", "ttt_e2e", "inner"),
    ("nano", "full", "none"),
    ("nano", "full", "block"),
    ("nano", "ttt_e2e", "none"),
    ("micro", "full", "none"),
    ("micro", "ttt_e2e", "block"),
    # the paper's smallest size at its length, one sequence (compiled, never run)
    ("125m", "full", "none"),
    ("125m", "ttt_e2e", "none"),
]


@pytest.mark.parametrize("preset,mixer,remat", CASES, ids=["-".join(c) for c in CASES])
def test_memory_estimate_is_within_tolerance_of_xla(preset, mixer, remat):
    over = {"data.batch_size": 1} if preset == "125m" else {}
    cfg = load_config(preset, {"model.mixer": mixer, "model.remat": remat, **over})
    xla = train_step_bytes(cfg)
    estimate = train_memory(cfg, backend="cpu").total
    assert abs(estimate / xla - 1) <= TOLERANCE, f"estimate {estimate:,.0f} vs XLA {xla:,.0f}"


def test_memory_follows_the_micro_batch_and_the_accumulator():
    """Activations scale with the sequences per replica per micro-step; accumulating
    gradients adds one gradient buffer; more replicas split the batch."""
    cfg = load_config("nano", {"model.mixer": "ttt_e2e"})
    whole, half = train_memory(cfg), train_memory(cfg.replace(**{"train.grad_accum": 2}))
    assert micro_batch(cfg) == 8 and micro_batch(cfg, devices=4) == 2
    assert half.gradients == 2 * whole.gradients and half.weights == whole.weights
    assert half.inner == pytest.approx(whole.inner / 2)
    assert train_memory(cfg, devices=2).inner == pytest.approx(half.inner)
    inner = train_memory(cfg.replace(**{"model.remat": "inner"}))
    assert inner.inner < whole.inner / 4  # only the carry stays per chunk


def test_a_reference_row_is_priced_at_its_own_throughput():
    """The MFU drawn from a reference row gives back that row's tokens/s on an H200."""
    for row in REFERENCE:
        cfg = row.config()
        r = rate(cfg, training=row.mode == "train")
        tokens = row.tokens_per_s * 3600
        hours = r.seconds(cfg, tokens, ACCELERATORS["h200"], 1, row.mode == "train") / 3600
        assert r.source == f"reference {row.label()}" and hours == pytest.approx(1.0)


def test_other_mixers_and_sizes_name_the_row_they_are_priced_from():
    swa = rate(load_config("3b", {"model.mixer": "swa"}))
    naive = rate(load_config("125m", {"model.mixer": "ttt_e2e", "ttt.meta": False}))
    e2e = rate(load_config("125m", {"model.mixer": "ttt_e2e", "data.seq_len": 32768}))
    assert swa.source == "reference 760m full train T=8K B=4"
    assert naive.source == "reference 125m full train T=8K B=8"  # no inner loop in training
    assert e2e.source == "reference 125m ttt_e2e train T=32K B=2"
