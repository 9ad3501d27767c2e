"""Byte-level corpora in the reference Zarr layout, and the batch loader."""

from ttt.data.loader import Loader, TokenSplit, open_split
from ttt.data.prepare import BOS, BYTE_VOCAB, prepare, stdlib_dataset

__all__ = ["BOS", "BYTE_VOCAB", "Loader", "TokenSplit", "open_split", "prepare", "stdlib_dataset"]
