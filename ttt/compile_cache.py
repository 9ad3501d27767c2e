"""Compiled steps cached on disk, shared by every run on a machine.

Trials that differ only in learning rates trace to the same XLA program (the rates are
traced inputs). A single-process run stores each step's executable whole and loads it
back on the next start, skipping tracing, lowering and compiling. A multi-process run
(whose executables cannot be stored whole) uses XLA's persistent cache instead, which
still traces and lowers. The two are never mixed in one process: an executable that XLA
loaded from its own cache serializes without its kernels on CPU and fails with
`NOT_FOUND: Function ... not found` when run again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
from jax.experimental import serialize_executable

from ttt import process
from ttt.config import shape_key
from ttt.paths import cache_root
from ttt.settings import settings

_active: Path | None = None  # the folder `enable` chose, once called


def cache_dir() -> Path:
    return Path(settings().compile_cache or cache_root() / "xla")


def disabled() -> bool:
    return settings().compile_cache == "off"


def enable(path: str | Path | None = None) -> Path:
    """Use the cache folder (idempotent); `TTT_COMPILE_CACHE=off` disables caching.
    Call it after `jax.distributed.initialize`, if the run has several processes."""
    if disabled():
        return Path()
    global _active
    directory = Path(path) if path is not None else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    _active = directory
    if jax.process_count() > 1:
        process.jax_option("jax_compilation_cache_dir", str(directory))
        # Cache every program: on CPU even a pico step compiles for seconds.
        process.jax_option("jax_persistent_cache_min_compile_time_secs", 0.5)
        process.jax_option("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


# --- Compiled executables ------------------------------------------------------------
# Tracing alone takes seconds for the second-order ttt_e2e step, so the executable is
# stored whole. The files are pickles: load them only from this machine's own cache.


@functools.cache
def _source_digest() -> str:
    """Any edit of the package's code gives new keys: a stale executable is never loaded."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def _signature(args) -> str:
    leaves, tree = jax.tree.flatten(args)
    shapes = [(x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    return f"{tree}|{shapes}"


@functools.cache
def _library_versions() -> tuple:
    """Every library whose code is traced into an executable: an Optax upgrade that
    changes the optimizer's math must not load the old program."""

    found = []
    for name in ("jax", "jaxlib", "flax", "optax"):
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            found.append((name, None))
    return tuple(found)


def executable_key(name: str, cfg, args) -> str:

    backend = jax.devices()[0].client
    parts = (
        name,
        shape_key(cfg),
        _signature(args),
        _source_digest(),
        jax.__version__,
        _library_versions(),
        backend.platform,
        backend.platform_version,
        tuple(d.device_kind for d in jax.devices()),
        os.environ.get("XLA_FLAGS", ""),
        str(jax.config.jax_default_matmul_precision),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def compiled(name: str, cfg, jitted, args):
    """`jitted` compiled for `args`: loaded from the executable cache when this exact
    program was compiled before, else compiled afresh and stored."""
    off = disabled() or _active is None
    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "sharding")]
    used = {d for x in leaves for d in x.sharding.device_set}
    # A program for a subset of the devices, or of several processes, is not stored whole:
    # loading binds an executable to all local devices.
    if off or jax.process_count() > 1 or (len(used) > 1 and used != set(jax.devices())):
        return jitted.lower(*args).compile()

    stem = name.split("[", 1)[0]  # what the key hashes, not the file name, tells programs apart
    path = _active / "executables" / f"{stem}-{executable_key(name, cfg, args)}.bin"
    if path.exists():
        try:
            blob, in_tree, out_tree = pickle.loads(path.read_bytes())
            return serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
        except Exception:  # unreadable or from another runtime: compile afresh below
            pass
    program = jitted.lower(*args).compile()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(pickle.dumps(serialize_executable.serialize(program)))
        tmp.replace(path)  # atomic: concurrent trials never read half a file
    except Exception:  # a backend that cannot serialize still runs, just uncached
        pass
    return program


class CachedStep:
    """Calls like the jitted step; compiles (or loads) at the first call, for its args.
    `by_shape`: one program per argument signature (a decoder's prefill, per prompt
    length) instead of one for all calls. `name` must carry whatever the function closes
    over that the config's shape key leaves out (traced settings baked in as constants)."""

    def __init__(self, name: str, cfg, jitted, by_shape: bool = False):
        self.name, self.cfg, self.jitted = name, cfg, jitted
        self.program = None
        self.programs: dict[str, object] | None = {} if by_shape else None

    def __call__(self, *args):
        if self.programs is not None:
            key = _signature(args)
            if key not in self.programs:
                self.programs[key] = compiled(self.name, self.cfg, self.jitted, args)
            return self.programs[key](*args)
        if self.program is None:
            self.program = compiled(self.name, self.cfg, self.jitted, args)
        return self.program(*args)
