"""A run directory: the one place that knows its layout.

    RUN/config.yaml        the run's config (absolute paths: it opens from any folder)
    RUN/run.json           status, step, data fingerprint, BOS id, devices
    RUN/metrics.jsonl      one line per logged step
    RUN/checkpoints/STEP/  Orbax checkpoints (params, opt_state, meta), each with a
                           manifest.json of its files' sizes and checksums, written last
                           (a checkpoint without one never finished, or predates them)
    RUN/tracking/          MLflow records not yet sent (`ttt.tracking.queue`; only its
                           meta.json when the server has them all)
    RUN/eval/              evaluation outputs, by kind: nll_by_position[_T<len>].parquet
                           (+ .json summary), tokens_<name>.parquet, niah.parquet (+ .png)

Opened once where a command or a trial starts and passed down; nothing else spells a path
inside a run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ttt.config import ConfigError, load_config
from ttt.errors import UserError

CONFIG, INFO, METRICS, CHECKPOINTS, EVAL = (
    "config.yaml",
    "run.json",
    "metrics.jsonl",
    "checkpoints",
    "eval",
)
# Written last into a checkpoint's folder: every other file's size and SHA-256.
MANIFEST = "manifest.json"
# The small files that travel with a checkpoint (a sweep trial's Tune checkpoint).
RECORD_FILES = (CONFIG, INFO, METRICS)


def companion(table: Path, kind: str) -> Path:
    """A table written beside an evaluation's per-position NLL: its log bins with their
    standard errors (`bins`), the recall task's accuracy by distance (`recall`)."""
    return table.with_name(f"{table.stem}_{kind}{table.suffix}")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path).expanduser())

    def __str__(self) -> str:
        return str(self.path)

    # -- the layout ----------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def info_file(self) -> Path:
        return self.path / INFO

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def tracking_spool(self) -> Path:
        """The queue of MLflow records of `ttt train --tracking-uri` (ttt.tracking.queue)."""
        return self.path / "tracking"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / str(step)

    def unreadable_checkpoint(self, step: int) -> Path:
        """Where a checkpoint that cannot be read is moved when a run resumes from an older
        one (kept for inspection; not a step name, so Orbax and `latest_step` skip it)."""
        return self.checkpoints / f"{step}.unreadable"

    def nll_table(self, seq_len: int | None = None, inner: bool = True, task: str = "loss"):
        """Per-position NLL of an evaluation: at the run's own length (written by
        training) or at `seq_len` (`ttt eval --seq-len`); `inner=False`: with the
        test-time updates skipped (`ttt eval --no-inner`); `task="recall"`: on the recall
        task (`ttt eval --task recall`), for a run trained on another dataset."""
        suffix = ("" if seq_len is None else f"_T{seq_len}") + ("" if inner else "_noinner")
        stem = "recall_nll_by_position" if task == "recall" else "nll_by_position"
        return self.eval_dir / f"{stem}{suffix}.parquet"

    def telemetry_table(self, seq_len: int) -> Path:
        """Each inner step's losses, gradient norms and update size (`--telemetry`)."""
        return self.eval_dir / f"inner_loop_T{seq_len}.parquet"

    def inner_split_figure(self, seq_len: int) -> Path:
        """NLL by position with and without the test-time updates, and their difference."""
        return self.eval_dir / f"inner_split_T{seq_len}.png"

    def tokens_table(self, name: str) -> Path:
        """Per-token NLL of `ttt eval --tokens NAME.npy`."""
        return self.eval_dir / f"tokens_{name}.parquet"

    @property
    def niah_table(self) -> Path:
        return self.eval_dir / "niah.parquet"

    def nll_tables(self) -> list[Path]:
        """Every per-position NLL table in eval/ (other kinds, NIAH's rows, are not)."""
        import polars as pl  # deferred: every command opens run directories; Polars is slow to load

        return [
            f
            for f in sorted(self.eval_dir.glob("*.parquet"))
            if {"position", "nll"} <= set(pl.read_parquet_schema(f))
        ]

    # -- what is in it -------------------------------------------------------------------

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir()

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, from the folder names (None without one)."""
        if not self.checkpoints.is_dir():
            return None
        return max(
            (int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit()), default=None
        )

    def saved_config(self) -> dict:

        return yaml.safe_load(self.config_file.read_text())

    def config(self, overrides: dict | None = None, **what):
        """The run's config with `overrides`; `what` names the flags behind the overrides
        in errors (`data.seq_len="--seq-len"`)."""

        if not self.is_run():
            raise UserError(f"RUN_DIR={str(self.path)!r}: no {CONFIG} there (not a run directory)")
        try:
            return load_config(self.saved_config(), overrides or {})
        except ConfigError as e:
            key = str(e).split("=", 1)[0]
            if key not in (what or {}):
                raise
            raise UserError(f"{what[key]}: {e}") from None

    def write_config(self, cfg) -> None:
        self.config_file.write_text(cfg.to_yaml())

    def info(self) -> dict:
        """run.json (status, step, BOS id, ...); {} where there is none."""
        return json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}

    def write_info(self, info: dict) -> None:
        self.info_file.write_text(json.dumps(info, indent=2))

    def check_bos(self, bos_id: int, what: str, hint: str = "") -> None:
        require_bos(self.info().get("bos_id"), bos_id, what, hint)


def require_bos(run_bos: int | None, bos_id: int, what: str, hint: str = "") -> None:
    """`what` (a dataset, a tokenizer) separates documents with `bos_id`: it must be the
    BOS the run was trained (or imported) with, or the wrong targets are masked."""
    if run_bos is not None and run_bos != bos_id:
        more = f"; {hint}" if hint else ""
        raise UserError(f"{what}: its BOS id is {bos_id}, the run's is {run_bos}{more}")
