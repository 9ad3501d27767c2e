"""`ttt import reference CKPT --out RUN`: a reference-format checkpoint as a run of ours.

The weights fix the shapes (layers, width, heads, MLP, vocab, TTT layers); the window,
chunk and inner learning rate are not in the checkpoint and come from the preset and
overrides. Only `model_weights` is read: the reference's optimizer state and data-iterator
position belong to its own training run, so a fine-tune starts a fresh optimizer
(`train.init_from=RUN`), and the imported run itself cannot be resumed.
"""

from __future__ import annotations

import shutil
import typing
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from ttt.config import PRESETS, Config, ConfigError, load_config, parse_overrides
from ttt.errors import UserError
from ttt.model import abstract_model, reference
from ttt.model.transformer import split_layers
from ttt.rundir import RunDir
from ttt.train.checkpoint import Checkpoints

LLAMA3_BOS = 128000
ITEM = "model_weights"


# Where the reference code's run directory keeps its step folders (its layout, not ours).
REFERENCE_CHECKPOINTS = "checkpoints"


def _manager_dir(ckpt: str):
    """The CheckpointManager directory: CKPT itself, or CKPT/checkpoints (a run directory
    of the reference code)."""

    # Absolute: Orbax's metadata call resolves a relative step path to nothing.
    path = epath.Path(Path(ckpt).expanduser().absolute())
    if not path.exists():
        raise UserError(f"CKPT={ckpt!r}: no such checkpoint directory")
    if not path.is_dir():
        raise UserError(
            f"CKPT={ckpt!r}: is a file; give the checkpoint directory (the one holding the "
            "numbered step folders, or the reference run directory above it)"
        )
    inner = path / REFERENCE_CHECKPOINTS
    if not any(p.name.isdigit() for p in path.iterdir()) and inner.is_dir():
        return inner
    return path


def read_weights(ckpt: str, step: int | None = None) -> tuple[dict, int]:
    """(flat name -> NumPy array, step) of a reference checkpoint's `model_weights`."""

    # Orbax warns, for a read-only manager and for an item read without the manager,
    # about things that are expected here.
    logging.set_verbosity(logging.ERROR)
    directory = _manager_dir(ckpt)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory, options=options) as manager:
        steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"CKPT={ckpt!r}: holds no finished checkpoint step")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"--step={step}: not in {ckpt}; its steps are {steps}")
    item = directory / str(step) / ITEM
    if not item.is_dir():
        raise UserError(f"CKPT={ckpt!r}: step {step} has no {ITEM} item")
    # Data files missing under an OCDBT manifest make TensorStore's reads fail on
    # background threads that print tracebacks past any handler here: check first.
    for manifest in Path(str(item)).rglob("manifest.ocdbt"):
        data = manifest.parent / "d"
        if not data.is_dir() or not any(data.iterdir()):
            raise UserError(
                f"CKPT={ckpt!r}: step {step}'s {ITEM} is incomplete: "
                f"{manifest.parent.relative_to(Path(str(directory)))}/d/ holds no data files"
            )
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(item)
        tree = metadata.item_metadata.tree if metadata.item_metadata is not None else None
        if tree is None:
            raise ValueError("no _METADATA")
        # NumPy on the host, in the stored dtype: no device copy, no float64 detour.
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        weights = checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # Orbax and TensorStore raise many types for damaged files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"CKPT={ckpt!r}: step {step}'s {ITEM} cannot be read, the checkpoint is damaged or "
            f"incomplete ({type(e).__name__}: {first})"
        ) from None
    return reference.flatten(weights), step


def matching_preset(found: dict) -> str | None:
    """The preset whose shapes are exactly the weights', if one is."""
    for name in PRESETS:
        flat = load_config(name, {"model.mixer": "ttt_e2e"}).flat()
        if all(flat[k] == v for k, v in found.items()):
            return name
    return None


def import_config(
    weights: dict, preset: str | None, overrides: typing.Sequence[str] = ()
) -> Config:
    """The run's config: shapes from the weights; everything else from the preset (the
    one the shapes match when none is given) and the overrides. A given preset or override
    that contradicts the weights is an error naming the key and both values."""
    found = reference.shapes(weights)
    given = parse_overrides(overrides)
    prime = reference.has_prime(weights)
    if prime:
        found["model.mixer"] = "ttt_e2e"
    elif given.get("model.mixer") not in ("full", "swa"):
        raise ConfigError(
            f"model.mixer={given.get('model.mixer', 'ttt_e2e')!r}: the checkpoint has no prime "
            "MLPs (h.prime_storage), so it is not a ttt_e2e model; give model.mixer=full or swa"
        )
    base = load_config(preset, given) if preset else None
    have = base.flat() if base else given  # what the user asked for, key by key
    for key, value in found.items():
        mine = have.get(key, value)
        if mine != value:
            origin = f"preset {preset}" if base and key not in given else "override"
            raise ConfigError(f"{key}={mine!r} ({origin}): the checkpoint's weights have {value!r}")
    if base:
        return base
    shape_only = {k: v for k, v in found.items() if k != "model.mixer"}
    name = matching_preset(shape_only) if prime else None
    return load_config(name or "pico", {**found, **given})


def import_reference(
    ckpt: str,
    out: str | Path,
    preset: str | None = None,
    overrides: typing.Sequence[str] = (),
    step: int | None = None,
    bos_id: int = LLAMA3_BOS,
) -> tuple[Config, int]:
    """Write RUN (`config.yaml`, `run.json`, `checkpoints/<step>/`) from a reference
    checkpoint; returns the config and the step."""

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={str(out)!r}: is a file; give a new run directory")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out={str(out)!r}: exists and is not empty; choose a new run directory")
    weights, step = read_weights(ckpt, step)
    cfg = import_config(weights, preset, overrides)
    n_prefix, n_suffix = split_layers(cfg.model)
    pure = reference.to_ours(weights, n_prefix, n_suffix, np.dtype(cfg.model.param_dtype))
    del weights  # `pure` holds views of the same buffers
    # Host jax.Arrays share the NumPy buffers (no copy on the CPU backend), and Orbax
    # saves them with about one model's worth in flight where NumPy leaves cost two.
    cpu = jax.devices("cpu")[0]
    pure = jax.tree.map(lambda x: jax.device_put(x, cpu), pure)
    _, state = nnx.split(abstract_model(cfg.model))
    _check_shapes(state.to_pure_dict(), pure)
    if not 0 <= bos_id < cfg.model.vocab_size:
        raise UserError(
            f"--bos-id={bos_id}: must be a token id below the vocabulary ({cfg.model.vocab_size})"
        )
    state.replace_by_pure_dict(pure)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ckpts = Checkpoints(out, keep=1)
        source = str(Path(ckpt).expanduser().absolute())
        meta = {"position": 0, "imported_from": source, "reference_step": step}
        ckpts.save(step, state, None, meta)
        ckpts.close()
        RunDir(out).write_config(cfg.with_absolute_paths())
        info = {
            "status": "imported",
            "step": step,
            "bos_id": bos_id,
            "imported_from": source,
            "format": "reference",
        }
        RunDir(out).write_info(info)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return cfg, step


def _check_shapes(expected: dict, got: dict, path: str = "") -> None:
    """Every weight the model needs, at its shape (a reference weight whose shape
    disagrees with the others, e.g. a k_norm of another head size)."""
    for key, want in expected.items():
        name = f"{path}.{key}" if path else str(key)
        if isinstance(want, dict):
            _check_shapes(want, got.get(key, {}), name)
        elif key not in got:
            raise UserError(f"checkpoint: no weight for {name}")
        elif tuple(got[key].shape) != tuple(want.shape):
            raise UserError(
                f"checkpoint: {name} has shape {tuple(got[key].shape)}, the model needs "
                f"{tuple(want.shape)}"
            )


def write_reference_checkpoint(directory: str | Path, step: int, weights: dict) -> Path:
    """A checkpoint in the reference's layout (`<directory>/<step>/model_weights`) from its
    nested `model_weights` tree (`reference.from_ours`); what tests and the import
    benchmark read back."""

    directory = Path(directory).absolute()
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.Composite(model_weights=ocp.args.StandardSave(weights)))
        manager.wait_until_finished()
    return directory
