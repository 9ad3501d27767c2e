"""Where this package keeps what it makes on its own (prepared corpora, compiled steps)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str = "") -> Path:
    """`cache_dir`, else `$TTT_CACHE`, else ~/.cache/ttt."""
    return Path(cache_dir or os.environ.get("TTT_CACHE") or Path.home() / ".cache" / "ttt")
