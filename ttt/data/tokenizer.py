"""Tokenizers for `ttt data prepare`: bytes (the default) or a Hugging Face `tokenizers`
tokenizer read from a local `tokenizer.json` (Llama 3's, or one trained by the user)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttt.errors import UserError

BYTE_BOS, BYTE_VOCAB = 256, 258  # 0..255 are bytes, then BOS and PAD
# BOS tokens of common tokenizers, tried in order when --bos-token is not given.
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|bos|>", "<|endoftext|>")


@dataclass(frozen=True)
class TextTokenizer:
    name: str  # "bytes", or the tokenizer file
    bos_id: int
    vocab_size: int
    digest: str  # enters the dataset's fingerprint: another tokenizer, another dataset
    encode_batch: Callable[[list[bytes]], list[np.ndarray]]
    decode: Callable[[list[int]], str]

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.encode_batch([text.encode()])[0]]

    @property
    def dtype(self):
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32


def byte_tokenizer() -> TextTokenizer:
    def encode(docs):
        return [np.frombuffer(d, np.uint8).astype(np.uint16) for d in docs]

    def decode(ids):  # the specials (BOS, PAD) are not text
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    return TextTokenizer("bytes", BYTE_BOS, BYTE_VOCAB, "bytes", encode, decode)


def load_tokenizer(spec: str | None, bos_token: str | None = None) -> TextTokenizer:
    """`None` or "bytes": bytes. Otherwise a local tokenizer.json (or a directory holding
    one). Nothing is downloaded: a hub name is an error that says so."""
    if spec in (None, "", "bytes"):
        return byte_tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"--tokenizer={spec!r}: no such local file; nothing is downloaded at run time, so "
            "save the tokenizer.json (e.g. from the model's repository) and pass its path"
        )
    from tokenizers import Tokenizer  # deferred: tokenizers is needed only for a tokenizer.json

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for a malformed file
        raise UserError(f"--tokenizer={spec!r}: not a tokenizers JSON file ({e})") from None
    names = (bos_token,) if bos_token else BOS_TOKENS
    bos = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
    if bos is None:
        what = f"has no token {bos_token!r}" if bos_token else "has none of " + ", ".join(names)
        raise UserError(f"--tokenizer={spec!r}: {what}; name its BOS with --bos-token")

    def encode(docs):
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        # No special tokens: the BOS between documents is added by prepare, once.
        encoded = tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.uint32) for e in encoded]

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return TextTokenizer(str(path), int(bos), vocab, digest, encode, lambda ids: tok.decode(ids))
