"""The project's own environment variables, read here and nowhere else (the README's
table lists them, with the Ray and MLflow variables `ttt` reads or sets). A sweep's Ray
job gets the submitting shell's `TTT_*` variables (`sweeps.job.FORWARD`), so a trial
reads the same values as the command that started it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    cache: Path  # TTT_CACHE: prepared corpora and compiled programs
    compile_cache: str  # TTT_COMPILE_CACHE: the executable cache's folder, or "off"
    ray_dir: str  # TTT_RAY_DIR: the local Ray cluster's folder ("" for the default)
    tune_verbose: int  # TTT_TUNE_VERBOSE: Tune's console verbosity
    untested_ray: bool  # TTT_UNTESTED_RAY=1: run with a Ray version not tested here


def settings() -> Settings:
    """The values now (a test or a notebook may change the environment between calls)."""
    env = os.environ
    verbose = env.get("TTT_TUNE_VERBOSE", "1")
    return Settings(
        cache=Path(env.get("TTT_CACHE") or Path.home() / ".cache" / "ttt"),
        compile_cache=env.get("TTT_COMPILE_CACHE", ""),
        ray_dir=env.get("TTT_RAY_DIR", ""),
        tune_verbose=int(verbose) if verbose.strip().isdigit() else 1,
        untested_ray=env.get("TTT_UNTESTED_RAY") == "1",
    )
