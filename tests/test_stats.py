"""What an evaluation's curve can carry (ttt/stats.py, ttt/train/evaluate.py): standard
errors over held-out sequences, and context use."""

from __future__ import annotations

import numpy as np
import pytest

from ttt.stats import context_spans, log_bin, ratio_mean_se
from ttt.train.evaluate import evaluate


def test_ratio_standard_error_is_the_sequences_spread():
    """With the same count in every sequence the ratio estimator's standard error is the
    plain one of the per-sequence means; with fewer than two sequences there is none."""
    rng = np.random.default_rng(0)
    means = rng.normal(2.0, 0.5, 200)
    counts = np.full(200, 16.0)
    mean, se = ratio_mean_se(means * counts, counts)
    assert mean == pytest.approx(means.mean())
    assert se == pytest.approx(means.std(ddof=1) / np.sqrt(200), rel=1e-9)
    assert np.isnan(ratio_mean_se([3.0], [2.0])[1])
    assert log_bin([0, 1, 2, 3, 7]).tolist() == [0, 4, 6, 8, 12]
    assert context_spans(256, 64) == ((33, 64), (129, 256))
    assert context_spans(64, 64) is None  # no context past the window to compare


class _Loader:
    """Held-out batches of a given size whose NLL the fake step below decides."""

    def __init__(self, sequences: int, seq_len: int, batch: int = 16):
        self.num_samples, self.seq_len, self.batch_size = sequences, seq_len, batch

    def batch_at(self, position: int):
        shape = (self.batch_size, self.seq_len)
        ids = np.arange(position, position + self.batch_size)[:, None] + np.zeros(shape, int)
        return ids, ids, np.ones(shape, bool)


def _step(nll_of):
    def step(params, batch, eta):
        inputs = np.asarray(batch[0])
        return nll_of(inputs[:, 0]), 0.0

    return step


def test_context_use_is_zero_within_its_error_when_position_does_not_matter():
    """NLL drawn i.i.d. whatever the position: context use is zero within three standard
    errors, and every log bin's error shrinks like one over the root of the sequences."""
    seq_len, window = 128, 32

    def iid(rows):
        rng = np.random.default_rng(rows[0])
        return rng.exponential(2.0, (len(rows), seq_len))

    put = lambda b: b  # noqa: E731
    few = evaluate(_step(iid), None, _Loader(64, seq_len), 0, 1.0, put, window=window)
    many = evaluate(_step(iid), None, _Loader(1024, seq_len), 0, 1.0, put, window=window)
    assert many.sequences == 1024 and many.context_use_se > 0
    assert abs(many.context_use) < 3 * many.context_use_se
    ratio = np.asarray(few.bins["se"]) / np.asarray(many.bins["se"])
    assert np.median(ratio) == pytest.approx(4.0, rel=0.25)  # sqrt(1024 / 64)
    assert many.loss == pytest.approx(2.0, abs=3 * many.loss_se)


def test_context_use_sees_a_loss_that_falls_beyond_the_window():
    """A loss that keeps falling with position: context use is the gap between the two
    spans, many standard errors from zero; one flat from half the window on (what SWA
    can do at best) gives zero."""
    seq_len, window = 128, 32
    positions = np.arange(seq_len)
    falling = 3.0 - np.log1p(positions) / 4  # still falls after the window
    flat = np.where(positions < window // 2, falling, falling[window // 2])

    def noisy(curve):
        def f(rows):
            rng = np.random.default_rng(rows[0])
            return curve + rng.normal(0, 0.5, (len(rows), seq_len))

        return f

    put = lambda b: b  # noqa: E731
    out = evaluate(_step(noisy(falling)), None, _Loader(256, seq_len), 0, 1.0, put, window=window)
    near, far = context_spans(seq_len, window)
    expected = falling[near[0] - 1 : near[1]].mean() - falling[far[0] - 1 : far[1]].mean()
    assert out.context_use == pytest.approx(expected, abs=3 * out.context_use_se)
    assert out.context_use > 10 * out.context_use_se
    none = evaluate(_step(noisy(flat)), None, _Loader(256, seq_len), 0, 1.0, put, window=window)
    assert abs(none.context_use) < 3 * none.context_use_se


def test_a_model_evaluated_on_iid_tokens_uses_no_context(tmp_path):
    """Documents of i.i.d. tokens (a Zipf law over the bytes): nothing in the context
    helps, so a model trained on them shows context use zero within its error, over the
    whole held-out split (`train.eval_batches=0`)."""
    import json

    from ttt.config import load_config
    from ttt.data.prepare import write_tokens
    from ttt.evaluation import Request, evaluate
    from ttt.train import run

    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 257) ** 1.1
    for split, n in (("train", 200_000), ("val", 100_000)):
        tokens = rng.choice(256, n, p=p / p.sum()).astype(np.uint16)
        tokens[::4000] = 256  # BOS between documents
        write_tokens(tmp_path / "iid", split, tokens, bos_id=256)
    meta = {"bos_id": 256, "vocab_size": 258, "fingerprint": "iid-zipf"}
    (tmp_path / "iid" / "meta.json").write_text(json.dumps(meta))
    cfg = load_config("pico", ["model.mixer=full", "data.seq_len=128", "model.window=32",
                               f"data.source={tmp_path / 'iid'}", "train.steps=30",
                               "train.eval_batches=0"])  # fmt: skip
    run(cfg, tmp_path / "r", progress=False)
    (m,) = evaluate(tmp_path / "r", Request())
    s = m.summary
    assert m.summary["sequences"] == 100_000 // 128 // 4 * 4  # every held-out batch
    assert 0 < s["context_use_se"] < 0.05 and abs(s["context_use"]) < 3 * s["context_use_se"], s
