"""A run's config and weights as evaluation reads them: the weights are loaded once, and
every length or task evaluated is the same weights under another config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import jax
from flax import nnx

from ttt import compile_cache
from ttt.config import Config
from ttt.data.loader import Dataset
from ttt.errors import UserError
from ttt.model import create_model
from ttt.rundir import RunDir, require_bos
from ttt.train.checkpoint import load_params, read_run_info
from ttt.train.step import data_mesh, replicated


@dataclass(frozen=True)
class LoadedRun:
    cfg: Config
    graphdef: object
    params: object  # replicated over the data mesh
    step: int
    info: dict  # run.json of the run the weights come from

    def under(self, cfg: Config) -> LoadedRun:
        """The same weights read under another config (a length, a batch, a task): only
        what does not change the weights' shapes may differ."""
        return dataclasses.replace(self, cfg=cfg)


def run_config(run_dir: str | Path, overrides: dict | None = None, **what) -> Config:
    """A run's saved config with `overrides`. `what` names the flags behind the
    overrides in errors (`data.seq_len="--seq-len"`)."""
    return RunDir(run_dir).config(overrides, **what)


def load_weights(cfg: Config, weights_dir: str | Path, key: str = "RUN_DIR") -> LoadedRun:
    """The latest weights of `weights_dir` (a run of ours, trained or imported), shaped
    by `cfg`, and that run's run.json."""
    compile_cache.enable()
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
    params, step = load_params(weights_dir, params, key=key)
    info = read_run_info(weights_dir)
    params = jax.device_put(params, replicated(data_mesh()))
    return LoadedRun(cfg, graphdef, params, step, info)


def open_data(run: LoadedRun) -> Dataset:
    """The dataset `run.cfg` names, checked against the weights: its ids must fit the
    vocabulary and its documents be separated by the run's BOS."""
    cfg = run.cfg
    data = Dataset(cfg, first="val")
    if data.recall is not None:
        return data  # drawn ids, below the byte BOS, which validation checked
    vocab = cfg.model.vocab_size
    if (data.vocab_size not in (None, vocab)) or data.bos_id >= vocab:
        # `ttt eval` takes no overrides and the weights fix the vocabulary: name what can move.
        raise UserError(
            f"data.source={cfg.data.source!r}: its ids (vocabulary {data.vocab_size}, BOS "
            f"{data.bos_id}) do not fit the run's weights (vocabulary {vocab}); point "
            "data.source in the run's config.yaml at a dataset of the run's tokenizer, or "
            "evaluate token ids with --tokens FILE.npy"
        )
    require_bos(run.info.get("bos_id"), data.bos_id, f"data.source={cfg.data.source!r}")
    return data
