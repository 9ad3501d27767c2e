"""JAX's persistent compilation cache, shared by every run on a machine.

Trials that differ only in learning rates trace to the same XLA program (the rates are
traced inputs), so the second trial loads the compiled executable instead of compiling.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from ttt.data.prepare import cache_root


def cache_dir() -> Path:
    return Path(os.environ.get("TTT_COMPILE_CACHE") or cache_root() / "xla")


def enable(path: str | Path | None = None) -> Path:
    """Point JAX at the cache (idempotent); `TTT_COMPILE_CACHE=off` disables it."""
    if os.environ.get("TTT_COMPILE_CACHE") == "off":
        return Path()
    directory = Path(path) if path is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program: on CPU even a pico step compiles for seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
