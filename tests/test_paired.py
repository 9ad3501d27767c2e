"""Paired differences with seed-bootstrap intervals (analysis/paired.py)."""

import numpy as np
import polars as pl
import pytest

from analysis.paired import bootstrap_interval, paired_delta


def runs(rows):
    return pl.DataFrame(rows, schema=["method", "data.seq_len", "train.seed", "loss"], orient="row")


def test_identical_pairs_give_a_zero_width_interval():
    frame = runs([(m, 256, s, 2.0 + 0.1 * s) for m in ("full", "ttt_e2e") for s in (0, 1, 2)])
    out = paired_delta(frame, "full", ["data.seq_len"], "loss")
    row = out.row(0, named=True)
    assert (row["delta"], row["delta_lo"], row["delta_hi"], row["pairs"]) == (0, 0, 0, 3)
    assert row["noise"]
    assert np.isnan(bootstrap_interval([0.3])).all()  # one pair: one seed has no interval
    one = paired_delta(frame.filter(pl.col("train.seed") == 0), "full", ["data.seq_len"], "loss")
    assert one["pairs"][0] == 1 and np.isnan(one["delta_lo"][0]) and one["noise"][0] is None


def test_the_evaluations_own_error_widens_the_interval():
    """Two seeds that agree exactly have no seed spread, but each evaluation read only so
    many held-out sequences: with their standard errors the interval is as wide as
    that error says (about 1.96 x se / sqrt(pairs) x sqrt(2) for two equal errors)."""
    d = np.array([-0.1, -0.1, -0.1, -0.1])
    assert bootstrap_interval(d) == pytest.approx((-0.1, -0.1))
    se = np.full(4, 0.05 * np.sqrt(2))  # each run 0.05
    lo, hi = bootstrap_interval(d, se)
    half = 1.96 * 0.05 * np.sqrt(2) / 2
    assert lo == pytest.approx(-0.1 - half, abs=0.01) and hi == pytest.approx(-0.1 + half, abs=0.01)
    rows = [(m, 256, s, 2.0 - 0.1 * (m == "ttt_e2e"), 0.05) for m in ("full", "ttt_e2e")
            for s in range(4)]  # fmt: skip
    frame = pl.DataFrame(rows, schema=["method", "data.seq_len", "train.seed", "loss", "se"],
                         orient="row")  # fmt: skip
    row = paired_delta(frame, "full", ["data.seq_len"], "loss", se="se").row(0, named=True)
    assert row["delta_lo"] == pytest.approx(lo, abs=0.01) and row["delta_hi"] < 0


def test_pairs_are_twins_by_seed_and_the_interval_is_the_means_spread():
    # Seed 0 is easy for both methods, seed 1 hard: unpaired, the methods' ranges overlap;
    # paired, ttt_e2e is 0.1 lower at every seed.
    frame = runs(
        [("full", 256, 0, 2.0), ("full", 256, 1, 2.5), ("ttt_e2e", 256, 0, 1.9)]
        + [("ttt_e2e", 256, 1, 2.4), ("ttt_e2e", 256, 7, 2.2)]  # seed 7 has no twin
    )
    row = paired_delta(frame, "full", ["data.seq_len"], "loss").row(0, named=True)
    assert row["pairs"] == 2
    assert row["delta"] == pytest.approx(-0.1)
    assert row["delta_lo"] == pytest.approx(-0.1) and row["delta_hi"] == pytest.approx(-0.1)
    # the same comparison at both seeds: no spread, so 0.1 is an effect here
    assert row["seed_spread"] == pytest.approx(0.0) and not row["noise"]


def test_a_difference_within_the_stores_seed_spread_is_noise():
    frame = runs(
        [("full", 256, s, 2.0) for s in (0, 1)]
        + [("swa", 256, 0, 2.3), ("swa", 256, 1, 2.7)]  # seeds move swa's gap by 0.4
        + [("ttt_e2e", 256, 0, 1.8), ("ttt_e2e", 256, 1, 1.75)]  # a gap of about 0.2
    )
    out = paired_delta(frame, "full", ["data.seq_len"], "loss")
    e2e = out.filter(pl.col("method") == "ttt_e2e").row(0, named=True)
    assert e2e["seed_spread"] == pytest.approx(0.4)
    assert e2e["delta_hi"] < 0 and e2e["noise"]  # its interval excludes 0, its size does not


def test_interval_covers_the_resampled_means():
    rng = np.random.default_rng(1)
    d = rng.normal(0.5, 0.2, 12)
    lo, hi = bootstrap_interval(d)
    assert lo < d.mean() < hi
    assert 0 < lo  # twelve pairs a clear 0.5 apart: not noise
    wide = bootstrap_interval([-1.0, 1.0])
    assert wide[0] < 0 < wide[1]


def test_seed_spread_needs_two_seeds():
    one = runs([("full", 256, 0, 2.0), ("swa", 256, 0, 2.5)])
    assert paired_delta(one, "full", ["data.seq_len"], "loss")["seed_spread"][0] is None


def test_compute_axis_is_each_runs_own_flop_count(tmp_path):
    """The compute figure puts a run's step at step x batch x length x its training FLOPs
    per token (`ttt.train.flops`, with the inner loop's cost for meta-learned TTT-E2E)."""
    from pathlib import Path

    from analysis.recipes import Data, compute
    from analysis.synthetic import spec_like
    from sweeps.spec import load_spec
    from ttt.config import load_config
    from ttt.train.flops import flops_per_token

    spec = Path(__file__).parent.parent / "sweeps" / "ladder_small.yaml"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec_like(uri, load_spec(spec, []))
    table = compute(Data(uri))
    base = ["data.batch_size=4", "train.eval_batches=4"]
    for method, overrides in {
        "swa": ["model.mixer=swa"],
        "ttt_e2e": ["model.mixer=ttt_e2e"],
    }.items():
        cfg = load_config("nano", [*base, *overrides])
        per_step = cfg.data.batch_size * cfg.data.seq_len
        per_step *= flops_per_token(cfg, training=True, inner=method == "ttt_e2e")
        rows = table.filter(pl.col("method") == method)
        np.testing.assert_allclose(rows["flops"], rows["step"] * per_step, rtol=1e-9)
    e2e, swa = (table.filter(pl.col("method") == m)["flops"].max() for m in ("ttt_e2e", "swa"))
    assert e2e > 1.5 * swa  # the same steps cost TTT-E2E more
