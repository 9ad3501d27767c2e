"""The corpus's floors: held-out cross-entropy of n-gram count models, orders 1..N.

A model above the trigram floor has not yet learned what the previous two tokens say;
its differences with another model are about how fast each learns local statistics, not
about long context (docs/small_scale.md). The count models are fitted on the training
split and scored on the held-out split, in nats per token, over the same targets the
models' loss counts (every target that is not BOS).

Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998, section 3.5), one absolute
discount per order, D_n = n1 / (n1 + 2 n2) from that order's count-of-counts; the
highest order uses raw counts, the lower ones continuation counts (how many distinct
tokens precede an n-gram), and the unigram level interpolates with the uniform
distribution over the vocabulary, so no held-out token has probability zero.

Everything is vectorised: an n-gram is an integer id, the index of the pair (its
(n-1)-gram prefix's id, its last token) among the training split's distinct pairs
(`np.unique`), so ids stay small for any vocabulary and order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ttt.data.loader import dataset_root, open_split
from ttt.errors import UserError
from ttt.paths import cache_root

ORDERS = 5
SMOOTHING = "interpolated Kneser-Ney (one discount per order, D = n1 / (n1 + 2 n2))"
# Caps on what is fitted and scored, so a released multi-billion-token corpus costs
# minutes, not hours; the built-in corpora fit under both. The sizes used are reported.
MAX_TRAIN_TOKENS = 64 << 20
MAX_VAL_TOKENS = 4 << 20
FILE = "floors.json"
NAMES = {1: "unigram", 2: "bigram", 3: "trigram", 4: "4-gram", 5: "5-gram"}


@dataclass(frozen=True)
class Floors:
    fingerprint: str
    orders: dict[int, float]  # order -> held-out nats per token
    train_tokens: int
    val_tokens: int  # held-out targets scored
    vocab_size: int
    smoothing: str = SMOOTHING
    seconds: float = 0.0

    def floor(self, order: int) -> float:
        return self.orders[order]

    def regime(self, loss: float | None) -> str | None:
        """Where a loss sits among the floors: `above unigram`, `above bigram`, ... (the
        lowest floor it has not reached), or `below N-gram` for the highest order."""
        if loss is None or not math.isfinite(loss):
            return None
        for order in sorted(self.orders):
            if loss > self.orders[order]:
                return f"above {NAMES.get(order, f'{order}-gram')}"
        top = max(self.orders)
        return f"below {NAMES.get(top, f'{top}-gram')}"

    def to_json(self) -> str:
        raw = asdict(self)
        raw["orders"] = {str(k): v for k, v in self.orders.items()}
        return json.dumps(raw, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Floors:
        raw = json.loads(text)
        raw["orders"] = {int(k): float(v) for k, v in raw["orders"].items()}
        return cls(**raw)

    def metrics(self) -> dict[str, float]:
        """As MLflow metrics (a sweep's parent run): `floor_1` .. `floor_N`."""
        return {f"floor_{k}": v for k, v in sorted(self.orders.items())}


def read_tag(text: str | None) -> dict[str, Floors]:
    """The floors a sweep's parent run records (tag `ttt.floors`: JSON of each
    data.source's `Floors.to_json`), by source; {} where there are none or they are
    unreadable."""
    try:
        raw = json.loads(text or "{}")
        return {k: Floors.from_json(v) for k, v in raw.items()}
    except (ValueError, TypeError, KeyError):
        return {}


def as_tag(floors: dict[str, Floors]) -> str:
    return json.dumps({k: f.to_json() for k, f in floors.items()})


def _discount(counts: np.ndarray) -> float:
    n1 = int(np.count_nonzero(counts == 1))
    n2 = int(np.count_nonzero(counts == 2))
    if n1 == 0:
        return 0.5
    return n1 / (n1 + 2 * n2) if n2 else 0.5


@dataclass
class _Counts:
    """One order's n-gram counts (raw, or continuation), and what interpolation needs."""

    count: np.ndarray  # per n-gram id
    discount: float
    ctx_total: np.ndarray  # per prefix id: the sum of `count` over its n-grams
    ctx_types: np.ndarray  # per prefix id: how many of its n-grams have count > 0

    @classmethod
    def of(cls, count: np.ndarray, context: np.ndarray) -> _Counts:
        n_ctx = int(context.max()) + 1 if len(context) else 1
        return cls(
            count=count,
            discount=_discount(count),
            ctx_total=np.bincount(context, weights=count, minlength=n_ctx),
            ctx_types=np.bincount(context, weights=count > 0, minlength=n_ctx),
        )

    def mix(self, at, hit, prefix, lower: np.ndarray) -> np.ndarray:
        """P(target | context) at this order, interpolated with `lower` (the next lower
        order's probability of the same target); an unseen context keeps `lower`."""
        seen = prefix >= 0
        c = np.where(hit, self.count[at], 0).astype(np.float64)
        ctx = np.where(seen, prefix, 0).clip(0, len(self.ctx_total) - 1)
        total = np.where(seen, self.ctx_total[ctx], 0.0)
        types = np.where(seen, self.ctx_types[ctx], 0.0)
        safe, d = np.maximum(total, 1.0), self.discount
        mixed = np.maximum(c - d, 0.0) / safe + d * types / safe * lower
        return np.where(total > 0, mixed, lower)


@dataclass
class _Order:
    """The training split's distinct n-grams of one order, by id (= index in `keys`)."""

    keys: np.ndarray  # prefix_id * vocab + last token, sorted
    raw: _Counts  # the top level of the model of this order
    cont: _Counts | None  # the lower level inside models of higher orders


# Key spaces up to this size are ranked by counting (O(n), a count per possible key);
# larger ones by Polars' multithreaded dense rank (a sort).
DENSE_SPACE = 1 << 26


def _unique(key: np.ndarray, space: int):
    """(sorted distinct keys, each key's index among them, their counts): `np.unique`
    with `return_inverse` and `return_counts`, without its single-threaded sort."""
    if space <= DENSE_SPACE:
        counts = np.bincount(key, minlength=space)
        present = counts > 0
        rank = np.cumsum(present) - 1
        return np.flatnonzero(present), rank[key], counts[present]
    inverse = pl.Series(key).rank("dense").to_numpy().astype(np.int64) - 1
    n = int(inverse.max()) + 1
    uniq = np.empty(n, key.dtype)
    uniq[inverse] = key
    return uniq, inverse, np.bincount(inverse, minlength=n)


def fit_and_score(train: np.ndarray, val: np.ndarray, vocab: int, bos: int,
                  orders: int = ORDERS) -> dict[int, float]:  # fmt: skip
    """Held-out nats per counted target (target != BOS) of interpolated KN models of
    orders 1..`orders` fitted on `train`."""
    train = np.asarray(train, np.int64)
    # starts[n][j]: id of the n-gram train[j : j + n]; its prefix is starts[n - 1][j]
    starts: dict[int, np.ndarray] = {}
    keys: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # order -> (sorted keys, counts)
    prefix = np.zeros(len(train), np.int64)  # order 0: the empty context, id 0
    for n in range(1, orders + 1):
        space = (int(prefix.max()) + 1) * vocab  # keys lie in [0, space)
        key = prefix[: len(train) - n + 1] * vocab + train[n - 1 :]
        uniq, inverse, counts = _unique(key, space)
        starts[n], keys[n] = inverse, (uniq, counts)
        prefix = inverse
    levels: dict[int, _Order] = {}
    for n in range(1, orders + 1):
        uniq, raw = keys[n]
        context = uniq // vocab
        cont = None
        if n < orders:  # continuation counts: distinct tokens seen before each n-gram
            above = starts[n + 1]
            where = np.zeros(len(keys[n + 1][0]), np.int64)
            where[above] = np.arange(len(above))  # one start of each (n+1)-gram
            suffix = starts[n][where + 1]  # the n-gram that ends it
            cont = _Counts.of(np.bincount(suffix, minlength=len(uniq)), context)
        levels[n] = _Order(uniq, _Counts.of(raw, context), cont)
    return _score(levels, np.asarray(val, np.int64), vocab, bos, orders)


def _score(levels: dict[int, _Order], val: np.ndarray, vocab: int, bos: int, orders: int):
    """Each order's held-out cross-entropy over the targets val[1:] that are not BOS.
    Level n of every model reads the context val[i-n+1 : i] of target val[i]."""
    target = val[1:]
    counted = target != bos  # the model's loss mask: a BOS target is never scored
    lower = np.full(len(target), 1.0 / vocab)  # below the unigram: uniform
    prefix = np.zeros(len(target), np.int64)  # the context's (n-1)-gram id; -1: unseen
    previous = val[:-1]  # the token before each target
    out = {}
    for n in range(1, orders + 1):
        lv = levels[n]
        key = np.where(prefix >= 0, prefix, 0) * vocab + target
        at = np.searchsorted(lv.keys, key).clip(0, len(lv.keys) - 1)
        hit = (prefix >= 0) & (lv.keys[at] == key)
        out[n] = float(-np.log(lv.raw.mix(at, hit, prefix, lower)[counted]).mean())
        if n == orders:
            break
        lower = lv.cont.mix(at, hit, prefix, lower)
        # the next order's context for target i is the n-gram ending at val[i - 1]: the
        # one this order looked up for target i - 1 (none before the first target)
        prefix = np.concatenate([[-1], np.where(hit, at, -1)[:-1]])
        if n == 1:  # the unigram context of target i is val[i - 1] itself
            first = np.searchsorted(levels[1].keys, previous).clip(0, len(levels[1].keys) - 1)
            prefix = np.where(levels[1].keys[first] == previous, first, -1)
    return out


def compute(train, val, vocab: int, bos: int, fingerprint: str, orders: int = ORDERS) -> Floors:
    """Floors of one dataset's splits (capped at `MAX_TRAIN_TOKENS` / `MAX_VAL_TOKENS`)."""
    start = time.perf_counter()
    train = np.asarray(train[:MAX_TRAIN_TOKENS])
    val = np.asarray(val[:MAX_VAL_TOKENS])
    values = fit_and_score(train, val, vocab, bos, orders)
    counted = int(np.count_nonzero(val[1:] != bos))
    seconds = time.perf_counter() - start
    return Floors(fingerprint, values, len(train), counted, vocab, seconds=round(seconds, 2))


def cached(root: Path, fingerprint: str) -> Floors | None:
    """The floors stored beside a dataset (or in the cache for a read-only one), when
    they are of this content (`fingerprint`)."""
    for path in (root / FILE, _fallback(fingerprint)):
        try:
            floors = Floors.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if floors.fingerprint == fingerprint:
            return floors
    return None


def _fallback(fingerprint: str) -> Path:

    return cache_root() / "floors" / f"{fingerprint}.json"


def _store(root: Path, floors: Floors) -> Path:
    """Beside the dataset's meta.json; in the cache when the dataset's folder is
    read-only (a shared copy of the released data)."""
    for path in (root / FILE, _fallback(floors.fingerprint)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(floors.to_json())
            tmp.replace(path)
            return path
        except OSError:
            continue
    raise UserError(f"floors of {root}: could not be written beside it nor in the cache")


def floors_of(source: str, cache_dir: str = "", orders: int = ORDERS) -> Floors:
    """The floors of a dataset (`data.source`), computed once per content fingerprint."""

    if source == "recall":
        raise UserError(
            "data.source='recall': a drawn task has no n-gram floor; its chance is "
            "1/recall.values (`ttt data stats recall` prints it)"
        )
    root = dataset_root(source, cache_dir)
    train = open_split(source, "train", cache_dir)
    found = cached(root, train.fingerprint)
    if found is not None and len(found.orders) >= orders:
        return found
    val = open_split(source, "val", cache_dir)
    # the released datasets name no vocabulary: the largest id seen bounds it
    seen = max(train.tokens[:MAX_TRAIN_TOKENS].max(), val.tokens[:MAX_VAL_TOKENS].max())
    vocab = train.vocab_size or int(seen) + 1
    floors = compute(train.tokens, val.tokens, vocab, train.bos_id, train.fingerprint, orders)
    _store(root, floors)
    return floors
