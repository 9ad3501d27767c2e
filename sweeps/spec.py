"""Sweep specs (YAML): parsing and validation, all before Ray starts.

Every error names the spec file and the key, in one line (`SpecError`, exit code 2).
The grid part of a sweep is expanded here into explicit override sets ("points"); the
random distributions stay Ray Tune domains, sampled `num_samples` times per point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ttt.config import SECTIONS, Config, ConfigError, load_config
from ttt.errors import UserError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = {
    "name",
    "description",
    "base",
    "search",
    "variants",
    "num_samples",
    "metric",
    "mode",
    "scheduler",
    "search_alg",
    "resources",
    "max_concurrent",
    "stop",
    "report_every",
    "checkpoint_every",
    "max_failures",
    "stages",
    "storage_path",
}


class SpecError(UserError):
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    start_from: str  # best | each
    overrides: dict[str, Any]
    steps: int | None


@dataclass(frozen=True)
class SweepSpec:
    path: str
    name: str
    base_source: str | None
    base_overrides: dict[str, Any]
    points: list[dict[str, Any]]  # expanded grid x variants
    random: dict[str, tuple[str, list]]  # key -> (distribution, args)
    num_samples: int = 1
    metric: str = "eval_loss"
    mode: str = "min"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search_alg: str = "basic"
    # cpu and gpu are per process; a trial runs one process on each of `nodes` nodes.
    resources: dict[str, float] = field(
        default_factory=lambda: {"cpu": 1.0, "gpu": 0.0, "nodes": 1}
    )
    max_concurrent: int = 0
    stop_steps: int | None = None
    stop_time_s: float | None = None
    report_every: int = 10
    checkpoint_every: int = 0
    max_failures: int = 1
    stages: list[Stage] = field(default_factory=list)
    storage_path: str = ""
    raw: dict = field(default_factory=dict)

    def trial_overrides(self, point: dict, sample: dict, stage: Stage | None = None) -> list[str]:
        """`dotted.key=value` overrides for one trial, in precedence order."""
        items = {**self.base_overrides, **point, **sample}
        if self.stop_steps is not None:
            items["train.steps"] = self.stop_steps
        items["train.log_every"] = self.report_every
        items["train.checkpoint_every"] = self.checkpoint_every
        if stage is not None:
            items.update(stage.overrides)
            if stage.steps is not None:
                items["train.steps"] = stage.steps
        return [f"{k}={_dump(v)}" for k, v in items.items()]

    def config(self, point: dict, sample: dict, stage: Stage | None = None) -> Config:
        return load_config(self.base_source, self.trial_overrides(point, sample, stage))


def _dump(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _err(path: str, key: str, msg: str) -> SpecError:
    return SpecError(f"{path}: {key}: {msg}")


CONFIG_KEYS = {"preset"} | {
    f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__
}


def _check_key(path: str, where: str, key: str) -> None:
    if key not in CONFIG_KEYS:
        raise _err(
            path,
            f"{where}.{key}",
            "not a config key (see `ttt config show`; "
            "keys look like model.window, ttt.inner_lr, data.seq_len)",
        )


def _overrides(path: str, where: str, value: Any) -> dict[str, Any]:
    """A mapping `{dotted.key: value}` or a list of `dotted.key=value` strings."""
    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise _err(path, where, f"expected dotted.key=value strings, got {item!r}")
            k, v = item.split("=", 1)
            out[k.strip()] = yaml.safe_load(v)
        value = out
    if not isinstance(value, dict):
        raise _err(path, where, f"expected a mapping of dotted keys, got {value!r}")
    for k in value:
        _check_key(path, where, k)
    return dict(value)


def _distribution(path: str, where: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _err(
            path, where, f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise _err(
            path, where, f"unknown distribution {kind!r}; allowed are {', '.join(DISTRIBUTIONS)}"
        )
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise _err(path, f"{where}.{kind}", f"expected a non-empty list, got {args!r}")
        return kind, args
    if not (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    ):
        raise _err(path, f"{where}.{kind}", f"expected [low, high] numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise _err(path, f"{where}.{kind}", f"low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        raise _err(path, f"{where}.{kind}", f"low={low} must be > 0 for a log scale")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise _err(path, f"{where}.{kind}", f"expected integer bounds, got {args!r}")
    return kind, [low, high]


def _search_block(path: str, where: str, block: Any):
    """(grid axes, fixed values, random domains) of a search mapping."""
    if block is None:
        return [], {}, {}
    if not isinstance(block, dict):
        raise _err(path, where, f"expected a mapping of dotted keys, got {block!r}")
    grids, fixed, random = [], {}, {}
    for key, spec in block.items():
        _check_key(path, where, key)
        if not isinstance(spec, dict):
            fixed[key] = spec
            continue
        kind, args = _distribution(path, f"{where}.{key}", spec)
        if kind == "grid":
            grids.append((key, args))
        else:
            random[key] = (kind, args)
    return grids, fixed, random


def _expand(grids, fixed) -> list[dict]:
    keys = [k for k, _ in grids]
    return [
        {**fixed, **dict(zip(keys, combo, strict=True))}
        for combo in itertools.product(*[vals for _, vals in grids])
    ]


def _int(path, key, value, low=0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _err(path, key, f"expected an integer >= {low}, got {value!r}")
    return value


def load_spec(path: str | Path) -> SweepSpec:
    path = str(path)
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such sweep spec")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise _err(path, str(key), f"unknown key; allowed are {', '.join(sorted(TOP_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(path, "name", f"expected a non-empty name without '/', got {name!r}")

    base = raw.get("base", "pico")
    if isinstance(base, str):
        base_source, base_over = base, {}
    elif isinstance(base, dict):
        unknown = set(base) - {"config", "overrides"}
        if unknown:
            raise _err(
                path, f"base.{sorted(unknown)[0]}", "unknown key; allowed are config, overrides"
            )
        base_source = base.get("config", "pico")
        base_over = _overrides(path, "base.overrides", base.get("overrides"))
    else:
        raise _err(path, "base", f"expected a preset, a config file or a mapping, got {base!r}")
    if base_source and not Path(base_source).is_absolute() and (p.parent / base_source).is_file():
        base_source = str(p.parent / base_source)  # config files are relative to the spec

    grids, fixed, random = _search_block(path, "search", raw.get("search"))
    points = _expand(grids, fixed)
    variants = raw.get("variants")
    if variants is not None:
        if not isinstance(variants, list) or not variants:
            raise _err(path, "variants", "expected a non-empty list of search mappings")
        expanded = []
        for i, block in enumerate(variants):
            v_grids, v_fixed, v_random = _search_block(path, f"variants[{i}]", block)
            if v_random:
                raise _err(
                    path,
                    f"variants[{i}].{next(iter(v_random))}",
                    "random distributions belong in search:, variants take grid or values",
                )
            expanded += [{**pt, **vp} for pt in points for vp in _expand(v_grids, v_fixed)]
        points = expanded

    sched = raw.get("scheduler", "fifo")
    sched = {"type": sched} if isinstance(sched, str) else sched
    if not isinstance(sched, dict) or sched.get("type") not in ("fifo", "asha"):
        raise _err(
            path, "scheduler", f"expected fifo or {{type: asha, ...}}, got {raw.get('scheduler')!r}"
        )
    allowed_sched = {
        "type",
        "metric",
        "mode",
        "grace_period",
        "reduction_factor",
        "max_t",
        "brackets",
    }
    for k in sched:
        if k not in allowed_sched:
            raise _err(
                path,
                f"scheduler.{k}",
                f"unknown key; allowed are {', '.join(sorted(allowed_sched))}",
            )
    search_alg = raw.get("search_alg", "basic")
    if search_alg not in ("basic", "optuna"):
        raise _err(path, "search_alg", f"{search_alg!r}; allowed are basic, optuna")
    if search_alg == "optuna" and grids:
        raise _err(path, "search_alg", "optuna does not take grid: axes; use choice:")

    resources = raw.get("resources", {}) or {}
    allowed_res = {"cpu", "gpu", "nodes", "gpus_per_node"}
    if not isinstance(resources, dict):
        raise _err(path, "resources", f"expected a mapping, got {resources!r}")
    for k, v in resources.items():
        if k not in allowed_res:
            raise _err(
                path, f"resources.{k}", f"unknown key; allowed are {', '.join(sorted(allowed_res))}"
            )
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise _err(path, f"resources.{k}", f"expected a number >= 0, got {v!r}")
    nodes = resources.get("nodes", 1)
    if nodes != int(nodes) or nodes < 1:
        raise _err(path, "resources.nodes", f"{nodes}: expected a whole number of nodes >= 1")
    if "gpu" in resources and "gpus_per_node" in resources:
        raise _err(path, "resources.gpus_per_node", "give gpu or gpus_per_node, not both")
    gpu = float(resources.get("gpu", resources.get("gpus_per_node", 0)))
    if gpu > 1 and gpu != int(gpu):
        raise _err(path, "resources.gpu", f"{gpu}: fractions are for sharing one GPU (< 1)")
    if nodes > 1 and 0 < gpu < 1:
        raise _err(path, "resources.gpus_per_node", f"{gpu}: a multi-node trial takes whole GPUs")

    stop = raw.get("stop", {}) or {}
    if not isinstance(stop, dict) or set(stop) - {"steps", "time_s"}:
        raise _err(path, "stop", f"expected {{steps: N, time_s: S}}, got {stop!r}")
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise _err(path, "mode", f"{mode!r}; allowed are min, max")

    stages = []
    for i, st in enumerate(raw.get("stages", []) or []):
        if not isinstance(st, dict) or set(st) - {"name", "from", "overrides", "steps"}:
            raise _err(path, f"stages[{i}]", "expected {name, from: best|each, overrides, steps}")
        start_from = st.get("from", "best")
        if start_from not in ("best", "each"):
            raise _err(path, f"stages[{i}].from", f"{start_from!r}; allowed are best, each")
        stages.append(
            Stage(
                name=str(st.get("name", f"stage{i + 2}")),
                start_from=start_from,
                overrides=_overrides(path, f"stages[{i}].overrides", st.get("overrides")),
                steps=_int(path, f"stages[{i}].steps", st["steps"], 1) if "steps" in st else None,
            )
        )

    spec = SweepSpec(
        path=path,
        name=name,
        base_source=base_source,
        base_overrides=base_over,
        points=points,
        random=random,
        num_samples=_int(path, "num_samples", raw.get("num_samples", 1), 1),
        metric=str(raw.get("metric", "eval_loss")),
        mode=mode,
        scheduler=sched,
        search_alg=search_alg,
        resources={"cpu": float(resources.get("cpu", 1)), "gpu": gpu, "nodes": int(nodes)},
        max_concurrent=_int(path, "max_concurrent", raw.get("max_concurrent", 0)),
        stop_steps=_int(path, "stop.steps", stop["steps"], 1) if "steps" in stop else None,
        stop_time_s=float(stop["time_s"]) if "time_s" in stop else None,
        report_every=_int(path, "report_every", raw.get("report_every", 10), 1),
        checkpoint_every=_int(path, "checkpoint_every", raw.get("checkpoint_every", 0)),
        max_failures=_int(path, "max_failures", raw.get("max_failures", 1)),
        stages=stages,
        storage_path=str(raw.get("storage_path", "") or ""),
        raw=raw,
    )
    _validate_points(spec)
    return spec


def _bounds(kind: str, args: list) -> list:
    return list(args) if kind == "choice" else [args[0], args[1]]


def _validate_points(spec: SweepSpec) -> None:
    """Every grid point (with each random key at its bounds) must be a valid config."""
    corners = [
        dict(zip(spec.random, combo, strict=True))
        for combo in itertools.product(*[_bounds(k, a) for k, a in spec.random.values()])
    ] or [{}]
    for i, point in enumerate(spec.points):
        for sample in corners:
            for stage in [None, *spec.stages]:
                where = f"stages.{stage.name}" if stage else f"trial {i} {_short(point)}"
                try:
                    cfg = spec.config(point, sample, stage)
                except ConfigError as e:
                    raise SpecError(f"{spec.path}: {where}: {e}") from None
                _check_split(spec, cfg, where)


def _check_split(spec: SweepSpec, cfg: Config, where: str) -> None:
    """A multi-node trial splits each global batch over every process's devices (one per
    GPU, or one per CPU process)."""
    devices = spec.resources["nodes"] * max(int(spec.resources["gpu"]), 1)
    if devices > 1 and cfg.data.batch_size % (devices * cfg.train.grad_accum):
        raise SpecError(
            f"{spec.path}: {where}: data.batch_size={cfg.data.batch_size}: must be a multiple "
            f"of resources.nodes x GPUs per node x train.grad_accum = "
            f"{devices * cfg.train.grad_accum}"
        )


def _short(point: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in point.items()) + "}"
