"""Multi-query associative recall (Zoology's MQAR), as a training source and an evaluation.

Each sequence starts with BOS and holds `pairs` key-value definitions `k v` placed among
filler tokens; later in the same sequence each key comes back once as a query `k v`. The
value after a query is predictable only from its definition, `distance` tokens earlier
(key to key), so accuracy by distance measures how far back a model recalls: inside its
attention window, beyond it, and beyond several chunks of test-time training.

Token ids (all below the byte tokenizer's BOS, so every byte-level preset reads them):
keys `[0, keys)`, values `[keys, keys + values)`, filler after those. Distances are drawn
log-uniformly in `[2, max_distance]`, so every log2 bucket holds about as many queries.

The loss mask counts every value token, the definitions' too: a definition's value is
unpredictable (its key is new), but the next-token loss on it is what lets test-time
training write the pair into its fast weights, as the paper's inner loss would on text.
Accuracy and answer NLL are measured on the queries' values alone.

A sequence is a pure function of (seed, split, index): the training and held-out draws
differ by split, any T can be drawn, and a loader resumes at an exact position.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from ttt.data.tokenizer import BYTE_BOS
from ttt.errors import UserError

SOURCE = "recall"
SPLITS = {"train": 0, "val": 1}
MIN_DISTANCE = 2  # a query right after its definition
# Where a draw fails to place every pair (a crowded sequence), it tries again this often.
PLACEMENT_TRIES = 64


@dataclass(frozen=True)
class RecallTask:
    keys: int = 32
    values: int = 32
    filler: int = 16
    pairs: int = 8
    max_distance: int = 0  # 0: as far as the sequence allows
    repeat: int = 1  # the key is written this many times before its value (`k k v`)
    spacing: int = 0  # at least this many filler tokens between two definitions or queries
    val_sequences: int = 256
    seed: int = 0  # the task's own draw (not train.seed: every trial sees the same task)

    @property
    def vocab(self) -> int:
        """Ids used, below BOS."""
        return self.keys + self.values + self.filler

    @property
    def chance(self) -> float:
        """Accuracy of a model that knows a value comes but not which."""
        return 1.0 / self.values

    @property
    def seen_guess(self) -> float:
        """Accuracy of a model that remembers which values the sequence defined but not
        which key each belongs to, and guesses among them: E[1 / D] for D the distinct
        values of `pairs` draws from `values` (Stirling numbers of the second kind)."""
        k, v = self.pairs, self.values
        stirling = [[0] * (k + 1) for _ in range(k + 1)]
        stirling[0][0] = 1
        for n in range(1, k + 1):
            for d in range(1, n + 1):
                stirling[n][d] = d * stirling[n - 1][d] + stirling[n - 1][d - 1]
        ways = [math.perm(v, d) * stirling[k][d] for d in range(1, k + 1)]
        return sum(w / d for d, w in enumerate(ways, 1)) / v**k

    @property
    def width(self) -> int:
        """Tokens of one definition or query: the key (repeated), then the value."""
        return self.repeat + 1

    def reach(self, seq_len: int) -> int:
        """The longest distance a draw can hold: a pair at 1, its query ending at T."""
        longest = seq_len - self.width
        return min(self.max_distance or longest, longest)

    def fingerprint(self) -> str:
        blob = json.dumps({"source": SOURCE, **asdict(self)}, sort_keys=True)
        return "recall-" + hashlib.sha256(blob.encode()).hexdigest()[:12]

    def check(self, seq_len: int, key: str = "data.seq_len") -> None:
        """What no draw could hold: too few ids below BOS, or a length too short for
        its pairs and their queries."""
        if self.vocab > BYTE_BOS:
            raise UserError(
                f"recall.keys + recall.values + recall.filler = {self.vocab}: must be at "
                f"most {BYTE_BOS} (the ids below BOS)"
            )
        if self.pairs > self.keys:
            raise UserError(
                f"recall.pairs={self.pairs}: at most recall.keys={self.keys} (each pair has "
                "its own key)"
            )
        need = max(2 * self.width * self.pairs + 1, self.width + MIN_DISTANCE + 1)
        if seq_len < need:
            raise UserError(
                f"{key}={seq_len}: too short for recall.pairs={self.pairs} (each pair and "
                f"its query take {2 * self.width} tokens after BOS: at least {need})"
            )
        if self.repeat not in (1, 2):
            raise UserError(f"recall.repeat={self.repeat}: allowed are 1 (k v) and 2 (k k v)")
        if self.max_distance and self.max_distance < MIN_DISTANCE:
            raise UserError(
                f"recall.max_distance={self.max_distance}: at least {MIN_DISTANCE} "
                "(0: as far as the sequence allows)"
            )

    def draw(self, seq_len: int, split: str, index: int) -> Sequence:
        """Sequence `index` of `split`: T + 1 tokens (inputs and targets, as a loader cuts
        them), and per target position its role and distance."""
        rng = np.random.default_rng([self.seed, SPLITS[split], seq_len, index])
        n = seq_len + 1
        reach = self.reach(seq_len)
        for _ in range(PLACEMENT_TRIES):
            placed = _place(rng, n, self.pairs, reach, self.width, self.spacing)
            if placed is not None:
                break
        else:  # pragma: no cover - check() keeps the densest case placeable
            raise UserError(f"data.seq_len={seq_len}: could not place recall.pairs={self.pairs}")
        defs, queries = placed
        tokens = self.keys + self.values + rng.integers(0, self.filler, n)
        tokens[0] = BYTE_BOS
        keys = rng.choice(self.keys, self.pairs, replace=False)
        values = self.keys + rng.integers(0, self.values, self.pairs)
        last = self.repeat  # offset of the value within a definition or query
        for start in (defs, queries):
            for r in range(self.repeat):
                tokens[start + r] = keys
            tokens[start + last] = values
        # per target (position t predicts token t + 1): the value after the (last) key
        distance = np.zeros(seq_len, np.int32)
        distance[queries + last - 1] = queries - defs
        counted = np.zeros(seq_len, bool)
        counted[defs + last - 1] = counted[queries + last - 1] = True
        return Sequence(tokens.astype(np.int32), counted, distance)


@dataclass(frozen=True)
class Sequence:
    tokens: np.ndarray  # (T + 1,)
    counted: np.ndarray  # (T,) bool: the target is a value (definition or query)
    distance: np.ndarray  # (T,) > 0 where the target is a query's value, else 0


def _place(rng, n: int, pairs: int, reach: int, width: int = 2, spacing: int = 0):
    """Start positions of `pairs` definitions and their queries (`width` tokens each) in
    tokens 1..n-1, none within `spacing` tokens of another, each query `distance` after
    its definition (log-uniform in [MIN_DISTANCE, reach]); None when this draw crowds
    itself out."""
    free = np.ones(n, bool)
    free[0] = False
    defs, queries = [], []
    lo, hi = np.log(MIN_DISTANCE), np.log(reach + 1)
    for _ in range(pairs):
        for _ in range(PLACEMENT_TRIES):
            d = int(np.exp(rng.uniform(lo, hi)))
            d = min(max(d, max(MIN_DISTANCE, width + spacing)), reach)
            last = n - width - d  # the query's value at p + d + width - 1 <= n - 1
            if last < 1:
                continue
            p = int(rng.integers(1, last + 1))
            span = np.r_[p : p + width, p + d : p + d + width]
            if free[span].all():
                for start in (p, p + d):  # each event keeps `spacing` free around it
                    free[max(start - spacing, 0) : start + width + spacing] = False
                defs.append(p)
                queries.append(p + d)
                break
        else:
            return None
    return np.asarray(defs), np.asarray(queries)


class RecallLoader:
    """A `ttt.data.Loader` over drawn sequences: `batch_at(position)` gives
    `(inputs, targets, mask)`; `distances_at(position)` the queries' distances of the
    same rows. Training draws indices without end; the held-out split has
    `val_sequences`."""

    def __init__(self, task: RecallTask, split: str, seq_len: int, batch_size: int, *,
                 position: int = 0, name: str = "data.seq_len"):  # fmt: skip
        task.check(seq_len, name)
        self.task, self.split = task, split
        self.seq_len, self.batch_size, self.position = seq_len, batch_size, position
        self.num_samples = task.val_sequences if split == "val" else 1 << 40
        if self.num_samples < batch_size:
            raise UserError(
                f"recall.val_sequences={task.val_sequences}: fewer than one batch of "
                f"{batch_size} sequences"
            )

    def _rows(self, position: int) -> list[Sequence]:
        first = position % self.num_samples
        ids = [(first + i) % self.num_samples for i in range(self.batch_size)]
        return [self.task.draw(self.seq_len, self.split, i) for i in ids]

    def batch_at(self, position: int):
        rows = self._rows(position)
        tokens = np.stack([r.tokens for r in rows])
        return tokens[:, :-1], tokens[:, 1:], np.stack([r.counted for r in rows])

    def distances_at(self, position: int) -> np.ndarray:
        """The rows' query distances (B, T): > 0 where the target is a query's value."""
        return np.stack([r.distance for r in self._rows(position)])

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self.position)
        self.position += self.batch_size
        return batch
