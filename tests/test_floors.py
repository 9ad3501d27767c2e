"""The corpus's floors (ttt/data/floors.py): interpolated Kneser-Ney count models scored
on held-out text, cached per dataset fingerprint, and `ttt data stats`."""

from __future__ import annotations

import numpy as np
import pytest

from ttt.cli import main
from ttt.data.floors import Floors, fit_and_score, floors_of

SYMBOLS, BOS = 8, 8


def markov2(rng, docs: int, length: int, table: np.ndarray) -> np.ndarray:
    """`docs` documents (BOS first) of a chain whose next symbol depends on the two before
    it (`table[a, b]` is that distribution), each started from the chain's stationary
    pair distribution; generated for all documents at once."""
    cum = table.cumsum(-1)
    start = rng.choice(SYMBOLS * SYMBOLS, size=docs, p=stationary(table))
    x = np.zeros((docs, length), np.int64)
    x[:, 0], x[:, 1] = start // SYMBOLS, start % SYMBOLS
    u = rng.random((docs, length))
    for t in range(2, length):
        c = cum[x[:, t - 2], x[:, t - 1]]
        x[:, t] = np.minimum((u[:, t, None] > c).sum(-1), SYMBOLS - 1)
    return np.concatenate([np.full((docs, 1), BOS), x], axis=1).reshape(-1)


def stationary(table: np.ndarray) -> np.ndarray:
    """The pair chain's stationary distribution (power iteration on (a, b) -> (b, c))."""
    n = SYMBOLS
    move = np.zeros((n * n, n * n))
    for a in range(n):
        for b in range(n):
            move[a * n + b, b * n : b * n + n] = table[a, b]
    pi = np.full(n * n, 1 / (n * n))
    for _ in range(500):
        pi = pi @ move
    return pi / pi.sum()


def test_the_trigram_floor_is_the_entropy_rate_of_a_chain_that_looks_two_back():
    """Text drawn from a known Markov chain of order 2: the trigram model's held-out
    cross-entropy is its entropy rate within 0.02 nats, no higher order goes below it by
    more than that, and the unigram and bigram floors stay above it (they cannot see two
    symbols back)."""
    rng = np.random.default_rng(0)
    table = rng.dirichlet(np.full(SYMBOLS, 0.3), size=(SYMBOLS, SYMBOLS))
    rate = -(stationary(table).reshape(SYMBOLS, SYMBOLS, 1) * table * np.log(table)).sum()
    train, val = markov2(rng, 1000, 1000, table), markov2(rng, 100, 1000, table)
    floors = fit_and_score(train, val, SYMBOLS + 1, BOS, orders=5)
    assert abs(floors[3] - rate) < 0.02, (floors, rate)
    assert all(floors[n] > rate - 0.02 for n in (4, 5)), (floors, rate)
    assert floors[1] > floors[2] > rate + 0.1


def test_an_unseen_context_and_token_keep_a_finite_loss():
    """Held-out tokens the training split never had: smoothing down to the uniform
    distribution keeps every probability above zero."""
    train = np.array([3, 0, 1, 0, 1, 0, 1, 3, 0, 1], np.int64)
    val = np.array([3, 2, 2, 0, 2, 1], np.int64)
    floors = fit_and_score(train, val, vocab=4, bos=3, orders=3)
    assert all(np.isfinite(v) and v > 0 for v in floors.values())


def test_floors_are_computed_once_per_fingerprint(corpus, monkeypatch):
    import ttt.data.floors as module

    first = floors_of(str(corpus))
    assert (corpus / module.FILE).is_file()
    assert first.regime(first.orders[2] + 0.1) == "above bigram"
    assert first.regime(first.orders[5] - 0.1) == "below 5-gram"

    def recompute(*a, **k):
        raise AssertionError("recomputed although the dataset did not change")

    monkeypatch.setattr(module, "compute", recompute)
    again = floors_of(str(corpus))
    assert again == first and isinstance(again, Floors)


def test_data_stats_prints_the_floors_and_a_missing_folder_is_one_line(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "stats", str(corpus)])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "interpolated Kneser-Ney" in out and "trigram" in out and "fitted on" in out
    for argv, needle in (
        (["data", "stats", str(tmp_path / "nope")], "no such dataset directory"),
        (["data", "stats"], "Missing argument 'SOURCE'"),
        (["data", "stats", str(corpus), "--orders", "x"], "'--orders'"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
