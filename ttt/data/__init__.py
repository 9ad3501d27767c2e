"""Text corpora in the reference Zarr layout (bytes or a tokenizer.json), and the loader."""

from ttt.data.loader import Loader, TokenSplit, open_split
from ttt.data.prepare import builtin_dataset, prepare
from ttt.data.tokenizer import BYTE_BOS as BOS
from ttt.data.tokenizer import BYTE_VOCAB, load_tokenizer

__all__ = [
    "BOS",
    "BYTE_VOCAB",
    "Loader",
    "TokenSplit",
    "load_tokenizer",
    "open_split",
    "prepare",
    "builtin_dataset",
]
