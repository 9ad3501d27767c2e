"""Where this package keeps what it makes on its own (prepared corpora, compiled steps)."""

from __future__ import annotations

from pathlib import Path

from ttt.settings import settings


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir`, else `$TTT_CACHE`, else ~/.cache/ttt."""
    return Path(cache_dir) if cache_dir else settings().cache
