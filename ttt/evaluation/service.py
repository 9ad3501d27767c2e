"""`evaluate(run_dir, request, sinks)`: one call opens a run once (config, weights,
data), makes the measurements the request names at each length, and returns them.

The measurements (`Measurement.kind`):
- `loss`: loss and NLL by position, with standard errors and context use (the recall
  task's runs also get accuracy by distance);
- `noinner`: the same with the test-time updates skipped (`ttt_e2e` only);
- `telemetry`: each inner step's losses, gradient norms and update size (`ttt_e2e`);
- `recall`: the recall task (`ttt.data.recall`) at the length: accuracy and answer NLL
  by distance;
- `niah`: RULER's single-needle tasks (`ttt.niah`);
- `tokens`: the NLL of exactly the given token ids.

What is done with a measurement besides returning it is the caller's: `Sinks.render`
draws its figures (the CLI passes `analysis.run_figures.render_measurement`), `Sinks.track`
records it (`ttt.tracking.records.EvalTracker`). Both see measurements in order: at
each length telemetry, then `noinner`, then the loss (which names the `noinner` table
of its length, for the figure of what the updates bought).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ttt.config import Config
from ttt.data.recall import SOURCE as RECALL
from ttt.errors import UserError, writing
from ttt.evaluation import measure
from ttt.evaluation.weights import LoadedRun, load_weights, run_config
from ttt.niah import accuracy, build_samples, run_samples
from ttt.rundir import RunDir, companion
from ttt.train.telemetry import telemetry_summary

TASKS = ("loss", "niah", "recall")


@dataclass(frozen=True)
class NiahOptions:
    tasks: tuple[str, ...] = ("niah1", "niah2", "niah3")
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    tokenizer: str | None = None


@dataclass(frozen=True)
class Request:
    """What to measure. `seq_lens` empty: the run's own length."""

    task: str = "loss"
    seq_lens: tuple[int, ...] = ()
    max_batches: int | None = None  # None: the run's train.eval_batches (0: every batch)
    batch_size: int | None = None
    no_inner: bool = False
    telemetry: bool = False
    tokens: Path | None = None  # exactly these ids (task loss)
    out: Path | None = None  # where --tokens' table goes (default RUN/eval/)
    niah: NiahOptions = field(default_factory=NiahOptions)

    def check(self) -> None:
        """The combinations a command line can ask for and no evaluation can give, each one
        line naming the flag, before anything is loaded."""
        if self.task not in TASKS:
            raise UserError(f"--task={self.task!r}: allowed are {', '.join(TASKS)}")
        for flag, value in (("--max-batches", self.max_batches), ("--batch-size", self.batch_size)):
            if value is not None and value < (0 if flag == "--max-batches" else 1):
                raise UserError(f"{flag}={value}: must be >= {0 if flag == '--max-batches' else 1}")
        for t in self.seq_lens:
            if t < 1:
                raise UserError(f"--seq-len={t}: must be >= 1")
        for flag, value in (("--no-inner", self.no_inner), ("--telemetry", self.telemetry)):
            if value and (self.task != "loss" or self.tokens is not None):
                raise UserError(f"{flag}: only with --task loss over the validation split")
        if self.task == "niah":
            for flag, value in (("--tokens", self.tokens), ("--out", self.out),
                                ("--max-batches", self.max_batches),
                                ("--batch-size", self.batch_size)):  # fmt: skip
                if value is not None:
                    raise UserError(f"{flag}: only with --task loss (niah builds its own prompts)")
            if not self.seq_lens:
                raise UserError("--task niah: give the context lengths with --seq-len (repeatable)")
            if self.niah.samples < 1:
                raise UserError(f"--samples={self.niah.samples}: must be >= 1")
        if self.task == "recall" and (self.tokens is not None or self.out is not None):
            raise UserError("--tokens, --out: only with --task loss (recall draws its sequences)")
        if self.tokens is not None:
            if self.seq_lens or self.max_batches is not None or self.batch_size is not None:
                raise UserError(
                    "--tokens: fixes the sequences; drop --seq-len, --max-batches and --batch-size"
                )
        elif self.out is not None:
            raise UserError("--out: only with --tokens")


@dataclass
class Measurement:
    kind: str  # loss | noinner | telemetry | recall | niah | tokens
    seq_len: int | None
    summary: dict  # its numbers: what is printed and tracked
    tables: list[Path]  # what it wrote (the first is its main table)
    table: object = None  # a Polars frame for telemetry, niah and recall; else None
    figures: list[Path] = field(default_factory=list)  # drawn by the render sink
    # loss with `--no-inner`: the table of the same length with the updates skipped
    without_inner: Path | None = None


@dataclass
class Sinks:
    """Where measurements go besides the caller: `render(m, run_dir) -> figure files` and
    `track(m, run_dir)`. None: not drawn, not tracked."""

    render: Callable[[Measurement, Path], list[Path]] | None = None
    track: Callable[[Measurement, Path], None] | None = None


def _length_config(run_dir: Path, request: Request, seq_len: int | None, task: str) -> Config:
    overrides: dict = {} if seq_len is None else {"data.seq_len": seq_len}
    if request.batch_size is not None:  # evaluation takes no gradient to accumulate
        overrides.update({"data.batch_size": request.batch_size, "train.grad_accum": 1})
    if task == "recall":
        overrides["data.source"] = RECALL
    flags = {"data.seq_len": "--seq-len", "data.batch_size": "--batch-size"}
    if task == "recall":  # a recall error is about the length asked for
        flags |= {"recall.pairs": "--seq-len"}
    return run_config(run_dir, overrides, **flags)


def _needs_inner_loop(cfg: Config, run_dir: Path, request: Request) -> None:
    if cfg.model.mixer == "ttt_e2e":
        return
    if request.telemetry:
        raise UserError(
            f"--telemetry: {run_dir} is a {cfg.model.mixer} run; only ttt_e2e has an inner loop"
        )
    if request.no_inner:
        raise UserError(
            f"--no-inner: {run_dir} is a {cfg.model.mixer} run; only ttt_e2e has test-time "
            "updates to skip"
        )


def evaluate(run_dir: str | Path, request: Request, sinks: Sinks = Sinks()) -> list[Measurement]:
    """Every measurement `request` names, in order, each handed to the sinks as it is
    made. The weights are loaded once; every config is checked before they are."""
    request.check()
    run_dir = Path(run_dir)
    base = run_config(run_dir)
    _needs_inner_loop(base, run_dir, request)
    if request.tokens is not None:
        return _handed(_tokens(run_dir, base, request), run_dir, sinks)
    if request.task == "niah":
        return _handed(_niah(run_dir, base, request), run_dir, sinks)
    lengths = request.seq_lens or (None,)
    configs = [_length_config(run_dir, request, t, request.task) for t in lengths]
    weights = load_weights(base, run_dir)
    return _handed(_lengths(run_dir, weights, configs, request), run_dir, sinks)


def _handed(made: Iterator[Measurement], run_dir: Path, sinks: Sinks) -> list[Measurement]:
    """Each measurement drawn and tracked as it is made; a disk that refuses its tables
    or figures is one line (`ttt.errors.StorageError`)."""
    out = []
    with writing("evaluation tables and figures", RunDir(run_dir).eval_dir):
        for m in made:
            if sinks.render is not None:
                m.figures = list(sinks.render(m, run_dir))
            if sinks.track is not None:
                sinks.track(m, run_dir)
            out.append(m)
    return out


def _lengths(run_dir: Path, weights: LoadedRun, configs: list[Config], request: Request):
    rd = RunDir(run_dir)
    for cfg in configs:
        run, t = weights.under(cfg), cfg.data.seq_len
        if request.telemetry:
            path, table = measure.telemetry(run, run_dir, request.max_batches)
            yield Measurement("telemetry", t, telemetry_summary(table), [path], table)
        off_path = None
        if request.no_inner:  # first, as `ttt eval` has always printed them
            off_path = rd.nll_table(t, inner=False)
            _, off = measure.loss(run, off_path, request.max_batches, inner=False)
            yield Measurement("noinner", t, off, _written(off_path))
        kind = "recall" if request.task == "recall" else "loss"
        on_path = rd.nll_table(t, task=kind)
        result, summary = measure.loss(run, on_path, request.max_batches)
        yield Measurement(kind, t, summary, _written(on_path), _recall_frame(result),
                          without_inner=off_path)  # fmt: skip


def _written(path: Path) -> list[Path]:
    extra = [companion(path, k) for k in ("bins", "recall")]
    return [path, path.with_suffix(".json"), *(p for p in extra if p.exists())]


def _recall_frame(result):
    return pl.DataFrame(result.recall).drop("nll_sum") if result.recall else None


def _tokens(run_dir: Path, base: Config, request: Request):
    ids = measure.read_tokens(request.tokens)
    batch, seq_len = ids.shape[0], ids.shape[1] - 1
    overrides = {"data.seq_len": seq_len, "data.batch_size": batch, "train.grad_accum": 1}
    cfg = run_config(run_dir, overrides, **{"data.seq_len": f"--tokens ({seq_len} targets)"})
    run = load_weights(base, run_dir).under(cfg)
    out = request.out or RunDir(run_dir).tokens_table(Path(request.tokens).stem)
    result = measure.tokens(run, ids, Path(request.tokens), out)
    summary = {"loss": result.loss, "token_loss": result.token_loss, "sequences": batch,
               "seq_len": seq_len, "step": run.step}  # fmt: skip
    yield Measurement("tokens", seq_len, summary, [out, out.with_suffix(".json")])


def _niah(run_dir: Path, base: Config, request: Request):
    o = request.niah
    samples, tok = build_samples(run_dir, list(o.tasks), list(request.seq_lens),
                                 list(o.depths), o.samples, o.tokenizer)  # fmt: skip
    weights = load_weights(base, run_dir)  # once every prompt is known to be buildable
    frame, path = run_samples(run_dir, weights, samples, tok)
    table = accuracy(frame)
    rows = len(pl.read_parquet(path))  # this call's cells and every earlier one's
    summary = {"prompts": len(frame), "rows": rows, "step": weights.step}
    yield Measurement("niah", None, summary, [path], table)
