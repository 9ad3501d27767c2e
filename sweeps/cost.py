"""What a sweep will cost before it runs, and whether its trials fit: for every trial and
stage its parameters, tokens, training FLOPs, device memory per replica and time on the
named accelerators (`ttt.estimate`), the sweep's total in accelerator-hours, and for a
trial that would not fit, the micro-batch (or `model.remat`) that would. `ttt sweep run
SPEC --dry-run --on h100,h200,a100` prints it (`cost_table`).

A trial runs on `resources.nodes x resources.gpu` devices (one, for a CPU or a shared-GPU
spec), each a data-parallel replica. Sampled keys are priced at their costliest bound. A
stage that starts `from: best` runs one trial, priced as the costliest. ASHA's early
stops and the evaluations during training are not counted: the total is what the sweep
costs when every trial runs to its end.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from sweeps.spec import Stage, SweepSpec, corners
from ttt import process
from ttt.config import Config
from ttt.errors import UserError
from ttt.estimate import (
    ACCELERATORS,
    JAX_MEM_FRACTION,
    MEASURED,
    GiB,
    Memory,
    Rate,
    micro_batch,
    rate,
    train_memory,
)
from ttt.shapes import model_params
from ttt.train.flops import flops_per_token
from ttt.train.step import uses_inner_loop

REMATS = ("none", "block", "inner")  # in the order a researcher would try them


def accelerators(names: str | None) -> list[str]:
    """`--on h100,h200` as accelerator keys (None: h200); one line for a name not known."""
    allowed = f"allowed are {', '.join(sorted(ACCELERATORS))}, comma-separated"
    keys = [n.strip().lower() for n in ("h200" if names is None else names).split(",")]
    if not any(keys):
        raise UserError(f"--on {names!r}: names no accelerator; {allowed}")
    for key in filter(None, keys):
        if key not in ACCELERATORS:
            raise UserError(f"--on {names}: {key!r} is not an accelerator it knows; {allowed}")
    return list(dict.fromkeys(filter(None, keys)))


@dataclass(frozen=True)
class Row:
    """One trial in one stage (for a `from: best` stage, the one trial that goes on)."""

    trial: str  # its index in the dry run's table, or "best"
    label: str  # its swept values
    stage: str
    runs: int  # trials this row stands for (num_samples; 1 for a `from: best` stage)
    cfg: Config
    devices: int
    tokens: float
    flops: float
    memory: Memory | None  # None for an evaluation (its memory is not estimated)
    rate: Rate

    def hours(self, key: str) -> float:
        """Wall-clock hours of one such trial on its devices."""
        training = self.memory is not None
        acc = ACCELERATORS[key]
        return self.rate.seconds(self.cfg, self.tokens, acc, self.devices, training) / 3600

    def device_hours(self, key: str) -> float:
        return self.hours(key) * self.devices * self.runs


def devices_per_trial(spec: SweepSpec) -> int:
    gpu = spec.resources["gpu"]
    return spec.resources["nodes"] * (int(gpu) if gpu >= 1 else 1)


def usable_memory(spec: SweepSpec, key: str) -> float:
    """What JAX's allocator lets one of the trial's processes use on accelerator `key`: for
    a share of a GPU the fraction `ttt.process.trial_env` sets, for a whole GPU JAX's own
    (XLA_PYTHON_CLIENT_MEM_FRACTION, which a sweep's job passes on to its trials, or its
    default)."""
    gpu = spec.resources["gpu"]
    if 0 < gpu < 1:
        fraction = process.GPU_SHARE_OF_MEMORY * gpu
    else:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or JAX_MEM_FRACTION)
    return ACCELERATORS[key].memory * fraction


def _row(spec: SweepSpec, point: dict, stage: Stage | None, trial: str, label: str) -> Row:
    """The point's row at its costliest sampled corner."""
    training = spec.task == "train"
    devices = devices_per_trial(spec)
    options = []
    for sample in corners(spec):
        cfg = spec.config(point, sample, stage)
        if training:
            tokens = cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len
        else:  # eval_batches 0 is the whole held-out split, whose size is not known here
            tokens = cfg.train.eval_batches * cfg.data.batch_size * cfg.data.seq_len
        inner = uses_inner_loop(cfg, training)
        flops = tokens * flops_per_token(cfg, training=training, inner=inner)
        memory = train_memory(cfg, devices) if training else None
        name = stage.name if stage else "main"
        options.append(
            Row(
                trial,
                label,
                name,
                spec.num_samples,
                cfg,
                devices,
                tokens,
                flops,
                memory,
                rate(cfg, training),
            )  # fmt: skip
        )
    return max(options, key=_cost)


def _cost(row: Row) -> tuple:
    return (row.memory.total if row.memory else 0.0, row.flops / row.rate.mfu)


def sweep_rows(spec: SweepSpec) -> list[Row]:
    """Every trial of every stage, in the order they run."""
    moving = [k for k in dict.fromkeys(k for p in spec.points for k in p)
              if len({str(p.get(k)) for p in spec.points}) > 1]  # fmt: skip
    labels = [" ".join(f"{k}={p[k]}" for k in moving if k in p) for p in spec.points]
    rows = []
    for stage in [None, *spec.stages]:
        each = [_row(spec, p, stage, str(i), labels[i]) for i, p in enumerate(spec.points)]
        if stage is not None and stage.start_from == "best":  # which one is not known yet
            each = [dataclasses.replace(max(each, key=_cost), trial="best", label="", runs=1)]
        rows += each
    return rows


def fits_instead(spec: SweepSpec, row: Row, key: str) -> str:
    """For a row that does not fit on `key`: the largest micro-batch that would at its
    `model.remat`, else at the next remat that fits at all."""
    usable = usable_memory(spec, key)
    cfg, devices = row.cfg, row.devices
    per_replica = cfg.data.batch_size // devices
    sizes = [s for s in range(micro_batch(cfg, devices), 0, -1) if per_replica % s == 0]
    remats = [cfg.model.remat, *(r for r in REMATS if r != cfg.model.remat)]
    for remat in remats:
        for size in sizes:
            accum = per_replica // size
            trial = cfg.replace(**{"train.grad_accum": accum, "model.remat": remat})
            if train_memory(trial, devices).total <= usable:
                return _advice(
                    remat if remat != cfg.model.remat else "", size, sizes[0], accum, devices
                )
    least = min(
        train_memory(
            cfg.replace(**{"train.grad_accum": per_replica, "model.remat": r}), devices
        ).total
        for r in REMATS
    )
    return (
        f"nothing fits: 1 sequence per replica needs at least {_gib(least)} GiB (with the best "
        "model.remat); data parallelism does not split a sequence, so it takes a shorter "
        "data.seq_len"
    )


def _advice(remat: str, size: int, now: int, accum: int, devices: int) -> str:
    what = [f"model.remat={remat}"] if remat else []
    if size < now:
        what.append(
            f"{size} sequence(s) per replica per micro-step: train.grad_accum={accum} "
            f"(or data.batch_size={size * devices} without accumulating)"
        )
    return "fits with " + " and ".join(what)


def _si(v: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def _gib(v: float) -> str:
    g = v / GiB
    return "0" if g == 0 else f"{g:.0f}" if g >= 1000 else f"{g:.1f}" if g >= 1 else f"{g:.3f}"


def _hours(v: float) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.3g}"


def _header(spec: SweepSpec, keys: list[str], devices: int) -> list[str]:
    training = spec.task == "train"
    where = (
        "a CPU spec, priced as if each trial had one device"
        if spec.resources["gpu"] == 0
        else f"{devices} device(s) per trial"
    )
    lines = [
        f"cost of {'training' if training else 'evaluation'} ({where}; `h`: hours of one "
        f"trial on them{'; `!`: does not fit, see below' if training else ''}):"
    ]
    if training:
        lines.append(
            "  memory per replica in GiB, at `micro` sequences per micro-step: weights + AdamW "
            "(two moments) + grads (and the accumulator) + act (activations under "
            "model.remat) + inner (the inner loop's second-order state) = GiB"
        )
    else:
        lines.append("  an evaluation's memory is not estimated")
    for key in keys:
        acc = ACCELERATORS[key]
        lines.append(
            f"  {acc.name}: {acc.peak / 1e12:.0f} TFLOP/s dense bf16; {acc.memory / GiB:.0f} "
            f"GiB, {usable_memory(spec, key) / GiB:.1f} of them to a trial's process "
            "(JAX's allocator share)"
        )
    own = "none yet" if not MEASURED else f"{len(MEASURED)} row(s)"
    lines.append(
        f"  MFU: this project's own GPU measurement of the row (BENCHMARKS.md: {own}), else "
        "the reference implementation's H200 throughput (issue 38) at this project's FLOP "
        "count, from the row in `MFU from`"
    )
    return lines


def cost_table(spec: SweepSpec, keys: list[str]) -> str:
    """The dry run's cost section: one row per trial and stage, totals, fit warnings."""
    rows = sweep_rows(spec)
    training = spec.task == "train"
    memory = ["micro", "weights", "AdamW", "grads", "act", "inner", "GiB"] if training else []
    head = ["trial", "stage", "params", "tokens", "FLOPs", *memory,
            *(f"{ACCELERATORS[k].name} h" for k in keys), "MFU", "MFU from"]  # fmt: skip
    table = []
    for r in rows:
        m = r.memory
        fit = lambda k: "" if m is None or m.total <= usable_memory(spec, k) else "!"  # noqa: E731, B023
        cells = [r.trial, r.stage, _si(model_params(r.cfg.model)), _si(r.tokens),
                 f"{r.flops:.2e}"]  # fmt: skip
        if m is not None:
            parts = (m.weights, m.optimizer, m.gradients, m.activations, m.inner, m.total)
            cells += [str(micro_batch(r.cfg, r.devices)), *map(_gib, parts)]
        cells += [f"{_hours(r.hours(k))}{fit(k)}" for k in keys]
        cells += [f"{100 * r.rate.mfu:.1f}%", r.rate.source.removeprefix("reference ")]
        table.append(cells)
    widths = [max(len(h), *(len(t[j]) for t in table)) for j, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    lines = [*_header(spec, keys, rows[0].devices), fmt(head).rstrip()]
    lines += [fmt(cells).rstrip() for cells in table]
    runs = sum(r.runs for r in rows)
    totals = [
        f"{_hours(sum(r.device_hours(k) for r in rows))} {ACCELERATORS[k].name}-hours" for k in keys
    ]
    lines.append(f"sweep total: {', '.join(totals)} ({runs} trial-stages)")
    for r in rows:
        for k in keys:
            if r.memory is not None and r.memory.total > usable_memory(spec, k):
                what = f"trial {r.trial}" + (f" ({r.label})" if r.label else "")
                lines.append(
                    f"warning: {what} stage {r.stage} does not fit an {ACCELERATORS[k].name}: "
                    f"{_gib(r.memory.total)} GiB per replica, {_gib(usable_memory(spec, k))} "
                    f"usable; {fits_instead(spec, r, k)}"
                )
    return "\n".join(lines)
