"""Sweep specs (YAML): parsing and validation, all before Ray starts.

Every error names the spec file and the key, in one line (`SpecError`, exit code 2).
The grid part of a sweep is expanded here into explicit override sets ("points"); the
random distributions stay Ray Tune domains, sampled `num_samples` times per point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ttt.config import SECTIONS, Config, ConfigError, load_config
from ttt.data.loader import NAMED_SOURCES
from ttt.data.prepare import pydocs_files
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
    "system_metrics",
    "task",
}
# train: each trial trains. eval: each trial evaluates the weights of its
# `train.init_from` (a trained or imported run) on `data.source`'s validation split at
# `data.seq_len`, over `train.eval_batches` batches, and trains nothing.
TASKS = ("train", "eval")


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
    system_metrics: bool = True  # MLflow's CPU/memory/GPU metrics, sampled in each trial
    task: str = "train"  # or eval (TASKS)
    raw: dict = field(default_factory=dict)
    cli_overrides: tuple[str, ...] = ()
    # What a dry run let pass that a real one refuses (a dataset not downloaded yet).
    warnings: tuple[str, ...] = ()

    def digest(self) -> str:
        """What identifies the sweep on resume: the spec's content and the command line's
        overrides (not its description, not where it is stored)."""

        ident = {k: v for k, v in self.raw.items() if k not in ("description", "storage_path")}
        blob = json.dumps([ident, self.name, list(self.cli_overrides)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def trial_overrides(self, point: dict, sample: dict, stage: Stage | None = None) -> dict:
        """`{dotted.key: value}` for one trial, in precedence order."""
        items = {**self.base_overrides, **point, **sample}
        if self.stop_steps is not None:
            items["train.steps"] = self.stop_steps
        items["train.log_every"] = self.report_every
        items["train.checkpoint_every"] = self.checkpoint_every
        if stage is not None:
            items.update(stage.overrides)
            if stage.steps is not None:
                items["train.steps"] = stage.steps
        return items

    def config(self, point: dict, sample: dict, stage: Stage | None = None) -> Config:
        # The values are parsed already (YAML): they go in as they are, not via strings.
        backend = "gpu" if self.resources["gpu"] > 0 else "cpu"  # where its trials run
        return load_config(
            self.base_source, self.trial_overrides(point, sample, stage), backend=backend
        )

    def stage(self, name: str | None) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


@dataclass(frozen=True)
class TrialStart:
    """One trial, read once from the config dict Tune hands it: the grid point, the
    sampled values, the stage and the checkpoint a later stage starts from. Tune's
    param space holds the dict form (`as_dict`)."""

    point: dict
    sample: dict = field(default_factory=dict)
    stage: str | None = None
    init_from: str | None = None

    @classmethod
    def of(cls, config: dict) -> TrialStart:
        start = config.get("start") or config  # a later stage nests its start
        return cls(
            point=dict(start.get("point") or {}),
            sample=dict(start.get("sample") or {}),
            stage=config.get("stage"),
            init_from=start.get("init_from"),
        )

    def as_dict(self) -> dict:
        return {"point": self.point, "sample": self.sample, "init_from": self.init_from}

    def config(self, spec: SweepSpec) -> Config:
        overrides = dict(self.sample)
        if self.init_from:
            overrides["train.init_from"] = self.init_from
        return spec.config(self.point, overrides, spec.stage(self.stage))


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


def _cli_overrides(path: str, items, raw: dict) -> dict[str | None, dict[str, Any]]:
    """Command-line overrides: {None: base keys, stage name: that stage's keys}."""
    stages = {
        str(st.get("name", f"stage{i + 2}"))
        for i, st in enumerate(raw.get("stages") or [])
        if isinstance(st, dict)
    }
    out: dict[str | None, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"{item!r}: command-line overrides look like dotted.key=value")
        key, value = (x.strip() for x in item.split("=", 1))
        head, _, rest = key.partition(".")
        stage = head if head in stages and rest else None
        key = rest if stage else key
        _check_key(path, "command line" if stage is None else f"command line {stage}", key)
        try:
            out.setdefault(stage, {})[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(f"{item!r}: the value is not valid YAML") from None
    return out


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


def _in_variants(raw: dict, key: str) -> bool:
    return any(isinstance(v, dict) and key in v for v in raw.get("variants") or [])


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


# What a trial reports (the final report carries eval_loss), so what `metric` can be.
REPORTED = ("eval_loss", "loss", "grad_norm", "tokens_per_s", "mfu")
SCHEDULER_KEYS = ("type", "metric", "mode", "grace_period", "reduction_factor", "max_t", "brackets")


def _scheduler(path: str, sched: dict) -> dict:
    """Every ASHA field checked here, not when Ray builds the scheduler."""
    for k in sched:
        if k not in SCHEDULER_KEYS:
            raise _err(
                path,
                f"scheduler.{k}",
                f"unknown key; allowed are {', '.join(sorted(SCHEDULER_KEYS))}",
            )
    for k in ("grace_period", "max_t", "brackets"):
        if k in sched:
            _int(path, f"scheduler.{k}", sched[k], 1)
    if "reduction_factor" in sched:
        rf = sched["reduction_factor"]
        if not isinstance(rf, (int, float)) or isinstance(rf, bool) or rf <= 1:
            raise _err(path, "scheduler.reduction_factor", f"expected a number > 1, got {rf!r}")
    if sched.get("metric", "loss") not in REPORTED:
        raise _err(
            path,
            "scheduler.metric",
            f"{sched['metric']!r}; allowed are "
            f"{', '.join(REPORTED)} (ASHA compares trials on each report)",
        )
    if sched.get("mode", "min") not in ("min", "max"):
        raise _err(path, "scheduler.mode", f"{sched['mode']!r}; allowed are min, max")
    if "max_t" in sched and sched.get("grace_period", 1) > sched["max_t"]:
        raise _err(
            path,
            "scheduler.grace_period",
            f"{sched['grace_period']} must not exceed max_t={sched['max_t']}",
        )
    return sched


def _bool(path, key, value) -> bool:
    if not isinstance(value, bool):
        raise _err(path, key, f"expected true or false, got {value!r}")
    return value


def _read(path: str) -> dict:
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
    return raw


def _base(path: str, raw: dict, cli: dict) -> tuple[str, dict]:
    """(config source, overrides) of `base:`, with the command line's base overrides."""
    base = raw.get("base", "pico")
    if isinstance(base, str):
        source, over = base, {}
    elif isinstance(base, dict):
        unknown = set(base) - {"config", "overrides"}
        if unknown:
            raise _err(
                path, f"base.{sorted(unknown)[0]}", "unknown key; allowed are config, overrides"
            )
        source = base.get("config", "pico")
        over = _overrides(path, "base.overrides", base.get("overrides"))
    else:
        raise _err(path, "base", f"expected a preset, a config file or a mapping, got {base!r}")
    over.update(cli.get(None, {}))
    spec_dir = Path(path).parent
    if source and not Path(source).is_absolute() and (spec_dir / source).is_file():
        source = str(spec_dir / source)  # config files are relative to the spec
    return source, over


def _points(path: str, raw: dict, cli: dict) -> tuple[list[dict], dict, bool]:
    """(grid points, random domains, whether anything is a grid) of `search:` and
    `variants:`; a command-line override may not set a swept key."""
    grids, fixed, random = _search_block(path, "search", raw.get("search"))
    for key in cli.get(None, {}):
        if key in random or key in dict(grids) or _in_variants(raw, key):
            raise SpecError(
                f"{key}: swept by {path}; a command-line override sets a key the spec does "
                "not sweep (edit the spec, or copy it, to change the axis)"
            )
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
    return points, random, bool(grids or variants)


def _search_alg(path: str, raw: dict, gridded: bool) -> str:
    search_alg = raw.get("search_alg", "basic")
    if search_alg not in ("basic", "optuna"):
        raise _err(path, "search_alg", f"{search_alg!r}; allowed are basic, optuna")
    if search_alg == "optuna" and gridded:
        raise _err(
            path,
            "search_alg",
            "optuna samples every trial itself: use choice: instead of grid: and variants:",
        )
    return search_alg


def _objective(path: str, raw: dict) -> tuple[str, str]:
    metric = raw.get("metric", "eval_loss")
    if metric not in REPORTED:
        raise _err(
            path,
            "metric",
            f"{metric!r} is not reported by trials; allowed are {', '.join(REPORTED)}",
        )
    mode = raw.get("mode", "min")
    if mode not in ("min", "max"):
        raise _err(path, "mode", f"{mode!r}; allowed are min, max")
    return metric, mode


def _resources(path: str, raw: dict) -> dict:
    resources = raw.get("resources", {}) or {}
    allowed = {"cpu", "gpu", "nodes", "gpus_per_node"}
    if not isinstance(resources, dict):
        raise _err(path, "resources", f"expected a mapping, got {resources!r}")
    for k, v in resources.items():
        if k not in allowed:
            raise _err(
                path, f"resources.{k}", f"unknown key; allowed are {', '.join(sorted(allowed))}"
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
    return {"cpu": float(resources.get("cpu", 1)), "gpu": gpu, "nodes": int(nodes)}


def _stop(path: str, raw: dict) -> tuple[int | None, float | None]:
    stop = raw.get("stop", {}) or {}
    if not isinstance(stop, dict) or set(stop) - {"steps", "time_s"}:
        raise _err(path, "stop", f"expected {{steps: N, time_s: S}}, got {stop!r}")
    steps = _int(path, "stop.steps", stop["steps"], 1) if "steps" in stop else None
    return steps, float(stop["time_s"]) if "time_s" in stop else None


def _stages(path: str, raw: dict, cli: dict) -> list[Stage]:
    stages = []
    for i, st in enumerate(raw.get("stages", []) or []):
        if not isinstance(st, dict) or set(st) - {"name", "from", "overrides", "steps"}:
            raise _err(path, f"stages[{i}]", "expected {name, from: best|each, overrides, steps}")
        start_from = st.get("from", "best")
        if start_from not in ("best", "each"):
            raise _err(path, f"stages[{i}].from", f"{start_from!r}; allowed are best, each")
        name = str(st.get("name", f"stage{i + 2}"))
        stages.append(
            Stage(
                name=name,
                start_from=start_from,
                overrides=_absolute(
                    {
                        **_overrides(path, f"stages[{i}].overrides", st.get("overrides")),
                        **cli.get(name, {}),
                    }
                ),
                steps=_int(path, f"stages[{i}].steps", st["steps"], 1) if "steps" in st else None,
            )
        )
    return stages


def _task(path: str, raw: dict) -> str:
    task = raw.get("task", "train")
    if task not in TASKS:
        raise _err(path, "task", f"{task!r}; allowed are {', '.join(TASKS)}")
    if task == "eval":
        clashes = {
            "stages": bool(raw.get("stages")),
            "scheduler": raw.get("scheduler", "fifo") not in ("fifo", {"type": "fifo"}),
            "search_alg": raw.get("search_alg", "basic") != "basic",
        }
        for key, clash in clashes.items():
            if clash:
                raise _err(path, key, "not with task: eval (each trial is one evaluation)")
        if raw.get("metric", "eval_loss") != "eval_loss":
            raise _err(path, "metric", "task: eval reports eval_loss only")
    return task


def _schedule(path: str, raw: dict) -> dict:
    sched = raw.get("scheduler", "fifo")
    sched = {"type": sched} if isinstance(sched, str) else sched
    if not isinstance(sched, dict) or sched.get("type") not in ("fifo", "asha"):
        raise _err(
            path, "scheduler", f"expected fifo or {{type: asha, ...}}, got {raw.get('scheduler')!r}"
        )
    return _scheduler(path, sched)


def load_spec(
    path: str | Path,
    overrides: list[str] | tuple = (),
    name: str | None = None,
    dry_run: bool = False,
) -> SweepSpec:
    """Parse and check a spec, one section at a time. `overrides` (`dotted.key=value`, or
    `STAGE.dotted.key=value` for one stage) change the base config (or that stage) from
    the command line; `name` renames the sweep. Both are part of what identifies the
    sweep on resume. `dry_run`: a dataset that is not there is a warning in
    `spec.warnings`, not an error, so a sweep can be priced before its data is
    downloaded."""
    path = str(path)
    raw = _read(path)
    name = name or raw.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(path, "name", f"expected a non-empty name without '/', got {name!r}")
    cli = _cli_overrides(path, overrides, raw)
    base_source, base_over = _base(path, raw, cli)
    points, random, gridded = _points(path, raw, cli)
    base_over, points = _absolute(base_over), [_absolute(p) for p in points]
    metric, mode = _objective(path, raw)
    stop_steps, stop_time_s = _stop(path, raw)
    spec = SweepSpec(
        path=path,
        name=name,
        base_source=base_source,
        base_overrides=base_over,
        points=points,
        random=random,
        num_samples=_int(path, "num_samples", raw.get("num_samples", 1), 1),
        metric=metric,
        mode=mode,
        scheduler=_schedule(path, raw),
        search_alg=_search_alg(path, raw, gridded),
        resources=_resources(path, raw),
        max_concurrent=_int(path, "max_concurrent", raw.get("max_concurrent", 0)),
        stop_steps=stop_steps,
        stop_time_s=stop_time_s,
        report_every=_int(path, "report_every", raw.get("report_every", 10), 1),
        checkpoint_every=_int(path, "checkpoint_every", raw.get("checkpoint_every", 0)),
        max_failures=_int(path, "max_failures", raw.get("max_failures", 1)),
        stages=_stages(path, raw, cli),
        storage_path=str(raw.get("storage_path", "") or ""),
        system_metrics=_bool(path, "system_metrics", raw.get("system_metrics", True)),
        task=_task(path, raw),
        raw=raw,
        cli_overrides=tuple(overrides),
    )
    missing = _validate_points(spec)
    if missing and not dry_run:
        raise next(iter(missing.values()))
    return dataclasses.replace(spec, warnings=tuple(map(str, missing.values())))


def _bounds(kind: str, args: list) -> list:
    return list(args) if kind == "choice" else [args[0], args[1]]


def corners(spec: SweepSpec) -> list[dict]:
    """Each random key at each of its bounds (every choice), crossed: the samples that
    span what a trial may be ([{}] when nothing is sampled)."""
    return [
        dict(zip(spec.random, combo, strict=True))
        for combo in itertools.product(*[_bounds(k, a) for k, a in spec.random.values()])
    ] or [{}]


def _validate_points(spec: SweepSpec) -> dict[str, UserError]:
    """Every grid point (with each random key at its bounds) must be a valid config.
    Returns the datasets found missing, each with the error of its first trial, for the
    caller to raise or (a dry run) report."""
    missing: dict[str, UserError] = {}
    for i, point in enumerate(spec.points):
        for sample in corners(spec):
            for stage in [None, *spec.stages]:
                where = f"stages.{stage.name}" if stage else f"trial {i} {_short(point)}"
                try:
                    cfg = spec.config(point, sample, stage)
                except ConfigError as e:
                    raise SpecError(f"{spec.path}: {where}: {e}") from None
                _check_split(spec, cfg, where)
                try:
                    _check_source(spec, cfg, where)
                except UserError as e:
                    missing.setdefault(cfg.data.source, e)
                if spec.task == "eval" and not cfg.train.init_from:
                    raise SpecError(
                        f"{spec.path}: {where}: task: eval evaluates train.init_from's weights; "
                        "set train.init_from to a run directory (`ttt import reference` or "
                        "`ttt train` writes one)"
                    )
    return missing


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


def _check_source(spec: SweepSpec, cfg: Config, where: str) -> None:
    """A local dataset must exist before Ray starts; a URI is left to the trial."""
    src = cfg.data.source
    if src == "pydocs":  # its package must be installed before Ray starts
        pydocs_files()
    if src in NAMED_SOURCES or "://" in src:
        return
    if not Path(src).expanduser().is_dir():
        raise SpecError(
            f"{spec.path}: {where}: data.source={src!r}: no such dataset directory (override "
            f"it: ttt sweep run {spec.path} data.source=DIR, or STAGE.data.source=DIR for a "
            "stage; `ttt data prepare --out DIR` makes one)"
        )


PATH_KEYS = ("data.source", "train.init_from")


def _absolute(over: dict) -> dict:
    """Local paths made absolute where the spec is loaded: Tune runs each trial in its
    own working directory, where a relative path would point elsewhere."""
    out = dict(over)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value not in ("", *NAMED_SOURCES) and "://" not in value:
            out[key] = str(Path(value).expanduser().absolute())
    return out


def _short(point: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in point.items()) + "}"
