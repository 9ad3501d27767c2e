"""The evaluation service (ttt/evaluation): one call opens a run once, whatever it
measures, and a combination of measurements gives the numbers each gives alone."""

from __future__ import annotations

import pytest

from ttt.evaluation import Request, Sinks, evaluate
from ttt.train import run


@pytest.fixture(scope="module")
def pico_run(tmp_path_factory, corpus):
    from conftest import PICO_TRAIN

    from ttt.config import load_config

    out = tmp_path_factory.mktemp("eval") / "r"
    cfg = load_config("pico", [f"data.source={corpus}", *PICO_TRAIN, "train.steps=3",
                               "train.eval_batches=1"])  # fmt: skip
    run(cfg, out, progress=False)
    return out


def test_one_load_for_every_measurement_and_each_gives_its_own_numbers(pico_run, monkeypatch):
    """`--seq-len 64 --seq-len 128 --no-inner --telemetry`: the weights are read once
    (before: three times a length), in the order `ttt eval` prints them, and each
    measurement equals the same one asked for alone."""
    import ttt.evaluation.weights as weights

    calls = []
    real = weights.load_params

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "load_params", counted)
    seen = []
    sinks = Sinks(track=lambda m, run_dir: seen.append((m.kind, m.seq_len)))
    request = Request(seq_lens=(64, 128), max_batches=1, no_inner=True, telemetry=True)
    made = evaluate(pico_run, request, sinks)
    assert len(calls) == 1  # not once per length and mode, as `ttt eval` did before
    kinds = [(m.kind, m.seq_len) for m in made]
    assert kinds == seen == [(k, t) for t in (64, 128) for k in ("telemetry", "noinner", "loss")]
    by = {(m.kind, m.seq_len): m.summary for m in made}
    (alone,) = evaluate(pico_run, Request(seq_lens=(128,), max_batches=1))
    assert by[("loss", 128)] == alone.summary
    off, _ = evaluate(pico_run, Request(seq_lens=(128,), max_batches=1, no_inner=True))
    assert by[("noinner", 128)] == off.summary
    tele, _ = evaluate(pico_run, Request(seq_lens=(128,), max_batches=1, telemetry=True))
    assert by[("telemetry", 128)] == tele.summary
    assert by[("loss", 128)]["loss"] != by[("noinner", 128)]["loss"]  # the modes differ
