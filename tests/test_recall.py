"""The recall task (ttt/data/recall.py): multi-query associative recall drawn from a
seed, as a training source and through `ttt eval --task recall`."""

from __future__ import annotations

import numpy as np
import pytest

from ttt.config import load_config
from ttt.data.recall import RecallLoader, RecallTask
from ttt.data.tokenizer import BYTE_BOS
from ttt.errors import UserError


@pytest.mark.parametrize("repeat", [1, 2])
def test_a_draw_holds_each_pair_and_its_query_at_the_distance_it_names(repeat):
    """`k v` (or `k k v` with recall.repeat=2) definitions and queries: the target after
    each query's key is its definition's value, `distance` tokens later."""
    task = RecallTask(keys=16, values=16, filler=8, pairs=6, repeat=repeat)
    for index in range(50):
        s = task.draw(128, "train", index)
        tokens, counted, distance = s.tokens, s.counted, s.distance
        assert tokens.shape == (129,) and tokens[0] == BYTE_BOS and tokens[1:].max() < task.vocab
        queries = np.nonzero(distance)[0]
        assert len(queries) == task.pairs and counted.sum() == 2 * task.pairs
        for q in queries:  # target position q: input is the query's key, target its value
            d = int(distance[q])
            assert 2 <= d <= 128 - task.width
            assert tokens[q] == tokens[q - d] < task.keys  # the same key, defined d earlier
            assert tokens[q + 1] == tokens[q - d + 1]  # its value, the answer
            assert counted[q] and counted[q - d]  # both values count in the loss
        keys = tokens[1:][tokens[1:] < task.keys]
        assert sorted(np.unique(keys, return_counts=True)[1]) == [2 * repeat] * task.pairs
        if repeat == 2:
            assert (tokens[queries] == tokens[queries - 1]).all()  # the key written twice


def test_draws_are_deterministic_and_the_splits_differ():
    task = RecallTask()
    a, b = task.draw(64, "train", 7), task.draw(64, "train", 7)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.distance, b.distance)
    assert not np.array_equal(task.draw(64, "val", 7).tokens, a.tokens)
    assert not np.array_equal(RecallTask(seed=1).draw(64, "train", 7).tokens, a.tokens)
    val = RecallLoader(task, "val", 64, 8)
    assert val.num_samples == task.val_sequences
    np.testing.assert_array_equal(val.batch_at(0)[0], val.batch_at(task.val_sequences)[0])
    train = RecallLoader(task, "train", 64, 8, position=16)
    inputs, targets, mask = next(train)
    assert train.position == 24 and inputs.shape == (8, 64)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_distances_cover_every_log2_bucket_up_to_the_sequence():
    """Log-uniform distances: each bucket from 2 up to T holds a share of the queries
    (so accuracy by distance has data inside, beyond and far beyond a window)."""
    task = RecallTask(pairs=4)
    d = np.concatenate([task.draw(256, "train", i).distance for i in range(400)])
    d = d[d > 0]
    buckets = np.bincount(np.floor(np.log2(d)).astype(int))[1:]
    assert len(buckets) == 7  # 2-3, 4-7, ..., 128-255
    assert buckets.min() > 0.5 * buckets.mean()
    assert RecallTask(max_distance=16).draw(256, "train", 0).distance.max() <= 16


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.seq_len=16", "recall.pairs=8"], "data.seq_len=16: too short for recall.pairs=8"),
        (["recall.pairs=40"], "recall.pairs=40: at most recall.keys=32"),
        (["recall.keys=200", "recall.values=100"], "must be at most 256"),
        (["recall.values=0"], "recall.values=0: must be a positive integer"),
    ],
)
def test_a_task_no_draw_can_hold_is_one_line(overrides, needle):
    with pytest.raises(UserError, match=needle.replace("+", r"\+")):
        load_config("pico", ["data.source=recall", "data.seq_len=64", *overrides])


def test_the_recall_section_applies_only_to_the_recall_task():
    assert not any(k.startswith("recall.") for k in load_config("pico").flat())
    cfg = load_config("pico", ["data.source=recall", "recall.pairs=3"])
    assert cfg.flat()["recall.pairs"] == 3 and cfg.with_absolute_paths().data.source == "recall"


# The recall task's miniature: what the suite can train in seconds (one pair a sequence;
# sweeps/recall_small.yaml has two, and trains for minutes).
MINI = ["data.source=recall", "data.seq_len=16", "data.batch_size=32", "model.layers=2",
        "model.window=2", "recall.pairs=1", "recall.keys=4", "recall.values=8",
        "recall.filler=4", "recall.spacing=1", "recall.val_sequences=256",
        "train.eval_batches=0", "train.steps=150", "train.lr=3e-3"]  # fmt: skip


def test_full_attention_recalls_and_swa_is_at_chance_past_its_reach(tmp_path, capsys):
    """The task measures context: full attention trained on it recalls the value at
    every distance, while SWA (window 2, two layers: it reaches 4 tokens back) is at
    chance (1/8) past its reach, through `ttt eval --task recall` as a user runs it."""
    from ttt.cli import main
    from ttt.evaluation import Request, evaluate
    from ttt.train import run

    acc = {}
    for mixer in ("full", "swa"):
        run(load_config("pico", [*MINI, f"model.mixer={mixer}"]), tmp_path / mixer, progress=False)
        (m,) = evaluate(tmp_path / mixer, Request(task="recall"))
        acc[mixer] = dict(zip(m.table["distance_lo"], m.table["accuracy"], strict=True))
        assert m.table["queries"].sum() == 256  # every held-out query, one per sequence
    assert min(acc["full"].values()) >= 0.95, acc
    beyond = [a for d, a in acc["swa"].items() if d >= 4]
    assert beyond and all(abs(a - 1 / 8) < 0.08 for a in beyond), acc
    assert max(acc["swa"].values()) > 0.9  # inside its reach it recalls too
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "swa"), "--task", "recall", "--seq-len", "4"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "too short" in err, err
