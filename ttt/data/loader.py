"""Batches of `(inputs, targets, loss_mask)` from a flat token array.

Sample j covers tokens [j*T, (j+1)*T + 1): inputs drop the last token, targets the first,
and the mask is `target != BOS`. Training order is a seeded permutation per epoch, and a
loader resumes at an exact sample position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttt.data.prepare import BUILTIN, META, builtin_dataset
from ttt.data.recall import SOURCE as RECALL
from ttt.data.recall import RecallLoader
from ttt.data.tokenizer import BYTE_BOS
from ttt.errors import UserError

LLAMA3_BOS = 128000
# Sources named rather than pathed: the built-in corpora and the drawn recall task.
NAMED_SOURCES = (*BUILTIN, RECALL)
IN_MEMORY_BYTES = 1 << 30  # smaller splits are read once into RAM


@dataclass
class TokenSplit:
    tokens: np.ndarray | object  # an ndarray, or a zarr array read lazily
    bos_id: int
    path: Path
    fingerprint: str
    vocab_size: int | None = None  # from meta.json; the released datasets have none

    def check_vocab(self, vocab_size: int) -> None:
        """A model of `vocab_size` can read this split's ids."""
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise UserError(
                f"model.vocab_size={vocab_size}: the dataset {self.path.parent} has a vocabulary "
                f"of {self.vocab_size} (its meta.json); set model.vocab_size={self.vocab_size}"
            )
        if self.bos_id >= vocab_size:
            raise UserError(
                f"model.vocab_size={vocab_size}: smaller than the BOS id {self.bos_id} of "
                f"{self.path}; set model.vocab_size to the dataset's vocabulary"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self.tokens[start : start + length], dtype=np.int32)


def dataset_root(source: str, cache_dir: str = "") -> Path:
    """A built-in corpus (`stdlib`, `pydocs`; prepared on first use) or a prepared
    directory in the reference layout."""
    if source in BUILTIN:
        return builtin_dataset(source, cache_dir)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise UserError(
            f"data.source={source!r}: no such dataset directory "
            "(use stdlib or pydocs, or run `ttt data prepare --out DIR` first)"
        )
    return root


def open_split(source: str, split: str, cache_dir: str = "") -> TokenSplit:
    # deferred: ttt.config imports this module; zarr loads only when a dataset is opened
    import zarr

    root = dataset_root(source, cache_dir)
    path = root / split
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as e:  # zarr raises several types for missing/corrupt stores
        raise UserError(
            f"data.source={source!r}: {path} is not a readable Zarr array ({type(e).__name__})"
        ) from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(
            f"data.source={source!r}: {path} must be a 1-D integer token array, "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.shape[0] == 0:
        raise UserError(f"data.source={source!r}: {path} is empty")
    meta = {}
    if (root / META).is_file():
        meta = json.loads((root / META).read_text())
    bos = arr.attrs.get("bos_id", meta.get("bos_id", LLAMA3_BOS))
    tokens = arr
    if arr.nbytes <= IN_MEMORY_BYTES:
        try:
            tokens = arr[:]
        except Exception as e:
            raise UserError(
                f"data.source={source!r}: {path} could not be decoded ({type(e).__name__}: {e})"
            ) from None
    fp = meta.get("fingerprint") or f"{arr.shape[0]}-{arr.dtype}"
    vocab = meta.get("vocab_size")
    return TokenSplit(tokens, int(bos), path, str(fp), int(vocab) if vocab else None)


class Loader:
    """Yields numpy batches; `position` counts samples consumed and is all that resume needs."""

    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        position: int = 0,
        name: str = "data.seq_len",
    ):
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.shuffle, self.position = seed, shuffle, position
        self.num_samples = (len(split) - 1) // seq_len
        if self.num_samples < batch_size:
            raise UserError(
                f"{name}={seq_len}: {split.path} holds {len(split):,} tokens, fewer than one "
                f"batch of {batch_size} sequences needs ({batch_size * seq_len + 1:,})"
            )
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = self.num_samples
            self._perm = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._epoch = epoch
        return self._perm

    def sample_ids(self, position: int, count: int) -> np.ndarray:
        ids = []
        for p in range(position, position + count):
            epoch, index = divmod(p, self.num_samples)
            ids.append(self._order(epoch)[index])
        return np.asarray(ids)

    def batch_at(self, position: int):
        t = self.seq_len
        rows = np.stack(
            [
                self.split.window(int(j) * t, t + 1)
                for j in self.sample_ids(position, self.batch_size)
            ]
        )
        inputs, targets = rows[:, :-1], rows[:, 1:]
        return inputs, targets, targets != self.split.bos_id

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self.position)
        self.position += self.batch_size
        return batch


class Dataset:
    """`data.source`'s two splits as a run reads them: a prepared corpus (`TokenSplit`s)
    or the drawn recall task (`ttt.data.recall`). What the trainer and evaluation open."""

    def __init__(self, cfg, first: str = "train"):
        """`first`: the split opened at once, whose fingerprint, BOS and vocabulary the
        dataset reports (training records the training split's; evaluation reads val)."""
        self.source, self.cache_dir = cfg.data.source, cfg.data.cache_dir
        self.recall = cfg.recall if self.source == RECALL else None
        self._splits: dict[str, TokenSplit] = {}
        if self.recall is not None:
            self.fingerprint, self.bos_id = self.recall.fingerprint(), BYTE_BOS
            self.vocab_size = None
        else:
            opened = self.split(first)
            self.fingerprint, self.bos_id = opened.fingerprint, opened.bos_id
            self.vocab_size = opened.vocab_size

    def split(self, name: str) -> TokenSplit:
        if self.recall is not None:
            raise UserError(
                "data.source='recall': a drawn task has no token file (needle in a haystack "
                "and --tokens need a text corpus)"
            )
        if name not in self._splits:
            self._splits[name] = open_split(self.source, name, self.cache_dir)
        return self._splits[name]

    def check_vocab(self, vocab_size: int) -> None:
        if self.recall is None:
            self.split("train").check_vocab(vocab_size)

    def loader(self, split: str, seq_len: int, batch_size: int, *, seed: int = 0,
               position: int = 0, name: str = "data.seq_len"):  # fmt: skip
        """The training order (`seed`, from `position`), or for `val` the held-out
        sequences in order."""
        if self.recall is not None:
            # the draw is the task's own (recall.seed): every trial sees the same task
            return RecallLoader(self.recall, split, seq_len, batch_size, position=position,
                                name=name)  # fmt: skip
        return Loader(self.split(split), seq_len, batch_size, seed=seed, position=position,
                      shuffle=split != "val", name=name)  # fmt: skip
