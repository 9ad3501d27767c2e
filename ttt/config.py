"""Typed, frozen run configs: presets, YAML loading, `dotted.key=value` overrides, validation.

Every check here runs before anything is traced, so a bad value costs one clear line
(`ConfigError`) instead of a shape error from deep inside JAX.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ttt.data.loader import NAMED_SOURCES
from ttt.data.recall import SOURCE as RECALL
from ttt.data.recall import RecallTask
from ttt.data.tokenizer import BYTE_BOS
from ttt.errors import UserError
from ttt.shapes import RECURRENT, matched_mlp

MIXERS = ("full", "swa", "hybrid", "gated_deltanet", "mamba2", "ttt_kvb", "ttt_e2e")
KVB_LOSSES = ("mse", "dot")
KVB_OUTPUTS = ("query", "key")
DTYPES = ("auto", "float32", "bfloat16", "float64")
REMAT = ("none", "block", "inner")
ATTENTION = ("auto", "dense", "xla", "cudnn")


class ConfigError(UserError, ValueError):
    """One line naming the key, the value and what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    mixer: str = "ttt_e2e"
    window: int = 256  # k: query i sees keys j with i - k < j <= i
    ttt_layers: int = 1  # final blocks that carry a prime MLP and learn at test time
    full_every: int = 6  # hybrid: every k-th layer attends fully, the rest within `window`
    ssm_state: int = 128  # mamba2: the state size N of each head
    # ttt_kvb (docs/ladder.md): fast-weight heads beside SWA in every block, trained at
    # test time on a layer-local key-value binding loss, `mse` ||g(k) - v||^2 (the
    # paper's) or `dot` -<g(k), v> (LaCT's code); the output reads g(q) (`query`) or, the
    # simplified output, the inner loss's own prediction g(k) (`key`); `kvb_lr` is the
    # per-token inner LR at initialisation (learned); `kvb_chunk` tokens per update, 0:
    # ttt.chunk.
    kvb_loss: str = "mse"
    kvb_output: str = "query"
    kvb_lr: float = 0.01
    kvb_chunk: int = 0
    # ttt_e2e: 0 = each TTT block's prime MLP is one regular MLP (the paper's TTT-E2E);
    # h >= 1 = it is split into h heads of width/h, each its own SwiGLU (Table 1's
    # "all layers, multi-head" rung, with model.ttt_layers = model.layers).
    fast_heads: int = 0
    layers: int = 4
    width: int = 64
    heads: int = 4
    mlp: int = 128
    vocab_size: int = 258
    tie_embeddings: bool = True
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    remat: str = "none"  # none | block (recompute each block) | inner (recompute each inner step)
    # Kernel for whole-sequence attention (first-order paths only; the inner loop's
    # chunks have ttt.chunk_attention): auto = cudnn on GPU in bf16, else dense.
    attention: str = "auto"


@dataclass(frozen=True)
class TTTConfig:
    chunk: int = 64  # b: tokens per inner step
    inner_lr: float = 1.0  # eta
    inner_lr_init: float = 0.1
    inner_lr_warmup: float = 0.1  # fraction of outer steps
    inner_clip: float = 1.0
    meta: bool = True
    # The chunk loop runs as up to this many scans, each with the KV cache its chunks
    # need (early chunks have fewer earlier tokens); 1 = one scan, one window-sized cache.
    cache_phases: int = 1
    # Kernel for the chunks' attention over their KV cache where nothing differentiates
    # through the inner updates (evaluation, prefill). Training with meta-learning takes
    # grad of grad through it, which cuDNN's backward cannot give, so it stays dense there.
    # dense until cudnn is measured on a GPU; values as for model.attention.
    chunk_attention: str = "dense"


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    seq_len: int = 1024
    batch_size: int = 8
    cache_dir: str = ""  # empty: $TTT_CACHE or ~/.cache/ttt


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    lr: float = 3.0e-3
    seed: int = 0
    warmup: float = 0.1  # fraction of steps of linear outer-LR warm-up
    min_lr: float = 1.0e-5
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4  # 0: the whole held-out split
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    init_from: str = ""
    peak_flops: float = 0.0  # 0: from the device kind
    # ttt_e2e: at every evaluation, also what the inner steps bought (`ttt eval
    # --telemetry` on the evaluated batches): inner_gain_own, inner_gain_next and
    # inner_update_rel as metrics, the table in RUN/eval/inner_loop_T*.parquet; and the
    # loss with the updates skipped (`ttt eval --no-inner`) as eval_loss_noinner.
    telemetry: bool = False
    # A loss above this ends the run as diverged, like a NaN would; 0: 3 x ln(vocab_size),
    # three times the loss of a uniform guess.
    max_loss: float = 0.0


@dataclass(frozen=True)
class Config:
    preset: str = "pico"
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The recall task's knobs (ttt.data.recall); they apply only to data.source=recall.
    recall: RecallTask = field(default_factory=RecallTask)

    def sections(self) -> list[str]:
        """The sections that apply: `recall` only to a run on the recall task, so that
        every other run's config and tracked params stay free of it."""
        return [s for s in SECTIONS if s != "recall" or self.data.source == RECALL]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if k not in SECTIONS or k in self.sections()}

    def flat(self) -> dict[str, Any]:
        """`{"model.window": 256, ...}`: the form used for overrides and tracking params."""
        out = {"preset": self.preset}
        for section in self.sections():
            for k, v in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{k}"] = v
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **flat: Any) -> Config:
        """A copy with dotted-key overrides, validated."""
        return load_config(self.to_dict(), flat)

    def with_absolute_paths(self) -> Config:
        """The paths a run names (its dataset, cache and starting run) made absolute against
        the current directory. A run's config.yaml stores these, so that the run opens from
        any folder, not only from the one it was made in."""
        flat = self.flat()
        paths = {
            key: str(Path(flat[key]).expanduser().absolute())
            for key in PATH_KEYS
            if flat[key] and flat[key] not in NAMED_SOURCES
        }
        changed = {k: v for k, v in paths.items() if v != flat[k]}
        return self.replace(**changed) if changed else self


# Settings that name a file or folder (data.source may also name a built-in corpus:
# `stdlib`, Python source, or `pydocs`, prose).
PATH_KEYS = ("data.source", "data.cache_dir", "train.init_from")

SECTIONS = {
    "model": ModelConfig,
    "ttt": TTTConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "recall": RecallTask,
}


# `mlp` is the regular MLP width for full/swa; `mlp_ttt` the narrower one used with
# ttt_e2e so that adding prime MLPs keeps the parameter count (the paper's Table 3).
PRESETS: dict[str, dict[str, Any]] = {
    "pico": dict(
        model=dict(
            layers=4,
            width=64,
            heads=4,
            mlp=192,
            window=64,
            ttt_layers=1,
            vocab_size=258,
            full_every=4,
        ),
        mlp_ttt=160,
        ttt=dict(chunk=16),
        data=dict(seq_len=128, batch_size=4),
        train=dict(lr=3e-3, steps=200),
    ),
    "nano": dict(
        model=dict(layers=6, width=128, heads=4, mlp=384, window=64, ttt_layers=2, vocab_size=258),
        mlp_ttt=288,
        ttt=dict(chunk=32),
        data=dict(seq_len=256, batch_size=8),
        train=dict(lr=3e-3, steps=300),
    ),
    "micro": dict(  # one step above nano: about 3x its parameters and compute
        model=dict(layers=8, width=192, heads=4, mlp=576, window=64, ttt_layers=2, vocab_size=258),
        mlp_ttt=456,
        ttt=dict(chunk=32),
        data=dict(seq_len=256, batch_size=8),
        train=dict(lr=3e-3, steps=300),
    ),
}
_PAPER = {  # size: layers, width, heads, mlp, mlp under ttt_e2e, ttt_layers, pre-train lr
    "125m": (12, 768, 12, 2048, 1664, 3, 3e-3),
    "350m": (24, 1024, 16, 2816, 2304, 6, 1.5e-3),
    "760m": (24, 1536, 16, 4096, 3328, 6, 1.25e-3),
    "1b": (24, 2048, 32, 5376, 4352, 6, 1e-3),
    "3b": (32, 2560, 32, 6912, 5632, 8, 8e-4),
}
for _name, (_l, _d, _h, _m, _mt, _tl, _lr) in _PAPER.items():
    PRESETS[_name] = dict(
        model=dict(
            layers=_l, width=_d, heads=_h, mlp=_m, window=8192, ttt_layers=_tl, vocab_size=128256
        ),
        mlp_ttt=_mt,
        ttt=dict(chunk=1024),
        data=dict(seq_len=8192, batch_size=8),
        train=dict(lr=_lr),
    )


def preset_keys() -> set[str]:
    """Every dotted key that some preset sets (`mlp_ttt` is `model.mlp` under ttt_e2e):
    the knobs that move with the model size."""
    keys = {"model.mlp"} if any("mlp_ttt" in p for p in PRESETS.values()) else set()
    for spec in PRESETS.values():
        keys |= {f"{section}.{k}" for section in SECTIONS for k in spec.get(section, {})}
    return keys


# Config keys that enter the compiled step as traced values or not at all: trials that
# differ only in these share one compiled program.
TRACED_KEYS = {
    "train.lr",
    "train.min_lr",
    "train.warmup",
    "train.steps",
    "train.seed",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.init_from",
    "train.peak_flops",
    "train.max_loss",
    "train.telemetry",
    "ttt.inner_lr",
    "ttt.inner_lr_init",
    "ttt.inner_lr_warmup",
    "data.source",
    "data.cache_dir",
    *(f"recall.{f.name}" for f in fields(RecallTask)),  # drawn on the host
}


# Knobs that act on some mixers only: elsewhere the config still holds a value, which
# nothing reads (full attention has a `model.window`, SWA a `ttt.chunk`). Every `ttt.*`
# key acts on `ttt_e2e` alone.
ONLY_FOR = {
    "model.window": ("swa", "hybrid", "ttt_kvb", "ttt_e2e"),
    "model.ttt_layers": ("ttt_e2e",),
    "model.full_every": ("hybrid",),
    "model.ssm_state": ("mamba2",),
    "model.fast_heads": ("ttt_e2e",),
    **{f"model.{k}": ("ttt_kvb",) for k in ("kvb_loss", "kvb_output", "kvb_lr", "kvb_chunk")},
    **{f"ttt.{f.name}": ("ttt_e2e",) for f in fields(TTTConfig)},
}


def applies(key: str, mixer: str) -> bool:
    """Whether `key` changes anything in a run of `mixer`."""
    return mixer in ONLY_FOR.get(key, (mixer,))


def shape_key(cfg: Config) -> tuple:
    """What decides the compiled program: everything but traced values and bookkeeping."""
    return tuple(sorted((k, v) for k, v in cfg.flat().items() if k not in TRACED_KEYS))


def _allowed(section: str) -> str:
    return ", ".join(f"{section}.{f.name}" for f in fields(SECTIONS[section]))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one leaf against its dataclass type; ints are accepted where floats are."""
    if isinstance(typ, str):
        typ = eval(typ, {}, {})  # annotations are strings under `from __future__`
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads `3e-3` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(number):  # YAML reads .inf and .nan; no knob means either
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return number
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise TypeError(typ)  # pragma: no cover - a field type this loader does not know


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. model.window=128")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if key == "preset":
        tree["preset"] = value
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"unknown key {key!r}: allowed are preset and {', '.join(s + '.*' for s in SECTIONS)}"
        )
    section, name = parts
    if name not in {f.name for f in fields(SECTIONS[section])}:
        raise ConfigError(f"unknown key {key!r}: allowed in {section} are {_allowed(section)}")
    tree.setdefault(section, {})[name] = value


def _flatten_user(tree: Any, origin: str) -> dict[str, Any]:
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(tree).__name__}")
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "preset":
            flat["preset"] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            for name, leaf in value.items():
                flat[f"{key}.{name}"] = leaf
        else:
            raise ConfigError(f"unknown key {key!r}: allowed are preset, {', '.join(SECTIONS)}")
    return flat


def read_source(source: str | Path | dict | None) -> dict[str, Any]:
    """A preset name, a YAML file or an already-loaded mapping, as a flat dict."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return _flatten_user(source, "config")
    text = str(source)
    if text in PRESETS:
        return {"preset": text}
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {text!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {text!r} is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        return _flatten_user(tree, text)
    raise ConfigError(f"config {text!r}: not a preset ({', '.join(PRESETS)}) nor a YAML file")


def parse_overrides(items: typing.Sequence[str]) -> dict[str, Any]:
    """`["model.window=128", ...]` -> `{"model.window": 128, ...}` (values parsed as YAML)."""
    return dict(map(_parse_override, items))


def load_config(
    source: str | Path | dict | None = None,
    overrides: typing.Sequence[str] | typing.Mapping[str, Any] = (),
    backend: str | None = None,
) -> Config:
    """defaults <- preset <- YAML <- overrides, then validate. Overrides are
    `dotted.key=value` strings (the command line) or a mapping of dotted keys to values
    that are already parsed (a sweep's trial). `backend` is where the config will run
    (`gpu`, `cpu`), when that is not this process."""
    user = read_source(source)
    if isinstance(overrides, typing.Mapping):
        items = overrides.items()
    else:
        items = map(_parse_override, overrides)
    for key, value in items:
        user[key] = value
    preset = user.pop("preset", "pico")
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: allowed are {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    tree: dict[str, Any] = {}
    for section in SECTIONS:
        for name, value in spec.get(section, {}).items():
            _set(tree, f"{section}.{name}", value)
    for key, value in user.items():
        _set(tree, key, value)
    model = tree.get("model", {})
    mixer = model.get("mixer", ModelConfig.mixer)
    fast_heads = model.get("fast_heads", ModelConfig.fast_heads)
    if "model.mlp" not in user and mixer == "ttt_e2e" and not fast_heads:
        tree["model"]["mlp"] = spec["mlp_ttt"]
    # Every other mixer with weights beyond attention's gets the MLP that gives the
    # whole model `full`'s parameter count (as the paper does for each baseline).
    matched = "model.mlp" not in user and (mixer in (*RECURRENT, "ttt_kvb") or fast_heads)
    built = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {
            name: _coerce(f"{section}.{name}", value, hints[name])
            for name, value in tree.get(section, {}).items()
        }
        built[section] = cls(**kwargs)
    cfg = Config(preset=preset, **built)
    if cfg.model.kvb_chunk == 0:  # ttt_kvb's chunk follows the inner loop's
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, kvb_chunk=cfg.ttt.chunk)
        )
    if matched:  # the baseline as large as full attention (the paper's matching)
        validate(cfg, backend)  # first: the formula needs valid shapes
        cfg = cfg.replace(**{"model.mlp": matched_mlp(cfg.model)})
    validate(cfg, backend)
    return cfg


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {allowed}")


def _up_to_layers(m: ModelConfig, name: str, low: int, why: str = "") -> None:
    value = getattr(m, name)
    allowed = f"must be between {low} and model.layers={m.layers}" + (f" ({why})" if why else "")
    _need(low <= value <= m.layers, f"model.{name}", value, allowed)


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _need(value in choices, key, value, f"allowed are {', '.join(choices)}")


def _kernels_exist(cfg: Config, backend: str | None) -> None:
    """A `cudnn` choice needs a GPU where the config runs: `backend` when the caller
    knows it (a sweep driver validating GPU trials on a CPU node), else this process's
    (JAX is started only for such a choice)."""
    for key, choice in (
        ("model.attention", cfg.model.attention),
        ("ttt.chunk_attention", cfg.ttt.chunk_attention),
    ):
        if choice != "cudnn":
            continue
        if backend is None:
            # deferred: configs load without JAX; only a cudnn choice asks for the backend
            import jax

            backend = jax.default_backend()
        if backend != "gpu":
            raise ConfigError(f"{key}='cudnn': needs a GPU; allowed here are auto, dense, xla")


def validate_recall(cfg: Config) -> None:
    r = cfg.recall
    for name in ("keys", "values", "filler", "pairs", "val_sequences"):
        v = getattr(r, name)
        _need(v >= 1, f"recall.{name}", v, "must be a positive integer")
    _need(r.max_distance >= 0, "recall.max_distance", r.max_distance, "must be >= 0 (0: T - 2)")
    try:
        r.check(cfg.data.seq_len)
    except UserError as e:
        raise ConfigError(str(e)) from None
    _need(
        cfg.model.vocab_size > BYTE_BOS,
        "model.vocab_size",
        cfg.model.vocab_size,
        f"data.source=recall writes ids up to BOS {BYTE_BOS}: needs more than {BYTE_BOS}",
    )


def validate(cfg: Config, backend: str | None = None) -> None:
    m, t, d, tr = cfg.model, cfg.ttt, cfg.data, cfg.train
    _one_of("model.mixer", m.mixer, MIXERS)
    for name in ("layers", "width", "heads", "mlp", "vocab_size", "window"):
        v = getattr(m, name)
        _need(v >= 1, f"model.{name}", v, "must be a positive integer")
    _need(m.width % m.heads == 0, "model.heads", m.heads, f"must divide model.width={m.width}")
    _need(
        (m.width // m.heads) % 2 == 0,
        "model.heads",
        m.heads,
        f"must leave an even head_dim (model.width={m.width}); RoPE rotates pairs",
    )
    if m.mixer == "hybrid":
        _up_to_layers(m, "full_every", 1, "every k-th layer attends fully")
    _need(m.ssm_state >= 1, "model.ssm_state", m.ssm_state, "must be a positive integer")
    _up_to_layers(m, "ttt_layers", 1 if m.mixer == "ttt_e2e" else 0)
    _one_of("model.kvb_loss", m.kvb_loss, KVB_LOSSES)
    _one_of("model.kvb_output", m.kvb_output, KVB_OUTPUTS)
    _need(m.kvb_lr > 0, "model.kvb_lr", m.kvb_lr, "must be > 0")
    _need(m.kvb_chunk >= 1, "model.kvb_chunk", m.kvb_chunk, "must be a positive integer")
    _need(m.fast_heads >= 0, "model.fast_heads", m.fast_heads, "must be >= 0 (0: one MLP)")
    if m.fast_heads:
        _need(m.mixer == "ttt_e2e", "model.fast_heads", m.fast_heads, "needs model.mixer=ttt_e2e")
        for name in ("width", "mlp"):
            _need(
                getattr(m, name) % m.fast_heads == 0,
                "model.fast_heads",
                m.fast_heads,
                f"must divide model.{name}={getattr(m, name)}",
            )
    _one_of("model.param_dtype", m.param_dtype, ("float32", "float64"))
    _one_of("model.compute_dtype", m.compute_dtype, DTYPES)
    _one_of("model.remat", m.remat, REMAT)
    _one_of("model.attention", m.attention, ATTENTION)

    _need(t.chunk >= 1, "ttt.chunk", t.chunk, "must be a positive integer")
    _need(t.inner_lr >= 0, "ttt.inner_lr", t.inner_lr, "must be >= 0")
    _need(t.inner_lr_init >= 0, "ttt.inner_lr_init", t.inner_lr_init, "must be >= 0")
    _need(
        0 <= t.inner_lr_warmup <= 1,
        "ttt.inner_lr_warmup",
        t.inner_lr_warmup,
        "must be a fraction of steps in [0, 1]",
    )
    _need(t.inner_clip > 0, "ttt.inner_clip", t.inner_clip, "must be > 0")
    _need(t.cache_phases >= 1, "ttt.cache_phases", t.cache_phases, "must be a positive integer")
    _one_of("ttt.chunk_attention", t.chunk_attention, ATTENTION)

    _need(d.seq_len >= 1, "data.seq_len", d.seq_len, "must be a positive integer")
    _need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be a positive integer")
    _need(
        bool(d.source),
        "data.source",
        d.source,
        "stdlib, pydocs, recall or a prepared dataset directory",
    )
    if d.source == RECALL:
        validate_recall(cfg)
    if m.mixer == "ttt_e2e":
        _need(
            d.seq_len % t.chunk == 0,
            "data.seq_len",
            d.seq_len,
            f"must be a multiple of ttt.chunk={t.chunk}",
        )

    _need(tr.steps >= 1, "train.steps", tr.steps, "must be a positive integer")
    _need(tr.lr > 0, "train.lr", tr.lr, "must be > 0")
    _need(tr.min_lr >= 0, "train.min_lr", tr.min_lr, "must be >= 0")
    _need(0 <= tr.warmup <= 1, "train.warmup", tr.warmup, "must be a fraction of steps in [0, 1]")
    _need(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "must be >= 0")
    _need(0 <= tr.b1 < 1, "train.b1", tr.b1, "must be in [0, 1)")
    _need(0 <= tr.b2 < 1, "train.b2", tr.b2, "must be in [0, 1)")
    _need(tr.clip > 0, "train.clip", tr.clip, "must be > 0")
    _need(tr.grad_accum >= 1, "train.grad_accum", tr.grad_accum, "must be a positive integer")
    _need(
        d.batch_size % tr.grad_accum == 0,
        "train.grad_accum",
        tr.grad_accum,
        f"must divide data.batch_size={d.batch_size}",
    )
    for name in ("log_every", "eval_every", "checkpoint_every"):
        v = getattr(tr, name)
        _need(v >= 0, f"train.{name}", v, "must be >= 0")
    _need(
        tr.eval_batches >= 0,
        "train.eval_batches",
        tr.eval_batches,
        "must be >= 0 (0: the whole held-out split)",
    )
    _need(
        tr.keep_checkpoints >= 1,
        "train.keep_checkpoints",
        tr.keep_checkpoints,
        "must be a positive integer",
    )
    _need(tr.peak_flops >= 0, "train.peak_flops", tr.peak_flops, "must be >= 0")
    _need(tr.max_loss >= 0, "train.max_loss", tr.max_loss, "must be >= 0 (0: 3 x ln(vocab))")
    if tr.telemetry:
        _need(m.mixer == "ttt_e2e", "train.telemetry", True, "needs model.mixer=ttt_e2e")
    _kernels_exist(cfg, backend)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "PRESETS",
    "TTTConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "validate",
    "MIXERS",
]
