"""One recipe per paper figure: select runs by the params that define the figure, average
over seeds (mean with min/max bands), and return the tidy table that the figure draws.

Recipes return `None` when the store holds no data for them. `analysis.figures.FIGURES`
pairs each recipe with its drawing and the sweep spec (or command) that produces its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from analysis.loaders import metric_history, runs, token_bins, token_nll
from analysis.paired import paired_delta
from ttt.config import ONLY_FOR, SECTIONS, load_config, preset_keys
from ttt.data.floors import read_tag
from ttt.data.recall import RecallTask
from ttt.stats import BINS_PER_OCTAVE

LOSS = "final_eval_loss"
LOSS_SE = "eval_loss_se"  # its standard error over the held-out sequences
# The knobs a figure may hold fixed or vary (docs/design.md, "Where to add").
KNOBS = [
    "preset",
    "model.window",
    "ttt.chunk",
    "ttt.inner_lr",
    "ttt.inner_lr_init",
    "ttt.meta",
    "model.ttt_layers",
    "data.seq_len",
    "data.batch_size",
    "train.steps",
    "train.lr",
    "stage",
]


@dataclass
class Data:
    """The runs of a store, with histories and per-token NLL loaded on first use."""

    tracking_uri: str
    experiments: list[str] | None = None
    _runs: pl.DataFrame | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def runs(self) -> pl.DataFrame:
        if self._runs is None:
            self._runs = with_method(runs(self.tracking_uri, self.experiments))
        return self._runs

    def bench(self) -> pl.DataFrame:
        if "bench" not in self._cache:
            self._cache["bench"] = runs(self.tracking_uri, self.experiments, role="bench")
        return self._cache["bench"]

    @property
    def evals(self) -> pl.DataFrame:
        """`ttt eval --tracking-uri` runs: one per (evaluated run, context length)."""
        if "evals" not in self._cache:
            self._cache["evals"] = with_method(runs(self.tracking_uri, self.experiments, "eval"))
        return self._cache["evals"]

    def floors(self) -> dict:
        """The corpus floors the sweeps' parent runs record (`ttt.data.floors`), by
        data.source: what every absolute loss is read against."""
        if "floors" not in self._cache:
            parents = runs(self.tracking_uri, self.experiments, role="sweep")
            found = {}
            if "floors" in parents.columns:
                for raw in parents["floors"].drop_nulls().to_list():
                    found |= read_tag(raw)
            self._cache["floors"] = found
        return self._cache["floors"]

    def history(self, run_ids, keys=("loss",)) -> pl.DataFrame:
        return metric_history(self.tracking_uri, list(run_ids), list(keys))

    def nll(self, run_ids) -> pl.DataFrame:
        return token_nll(self.tracking_uri, list(run_ids))

    def bins(self, run_ids) -> pl.DataFrame:
        return token_bins(self.tracking_uri, list(run_ids))


# Table 1's rungs other than a mixer's own name (docs/ladder.md).
KVB_SIMPLIFIED = "ttt_kvb (simplified output)"
MULTIHEAD = "ttt_e2e (all layers, multi-head)"


def with_method(frame: pl.DataFrame) -> pl.DataFrame:
    """`method`: the mixer, with meta-learning off marked (TTT-naive) and Table 1's rungs
    named: TTT-KVB's simplified output, and TTT-E2E's multi-head prime MLPs ("all
    layers" when every block has them)."""
    if frame.is_empty() or "model.mixer" not in frame.columns:
        return frame.with_columns(pl.lit(None, pl.String).alias("method"))

    def col(name, default):
        return pl.col(name) if name in frame.columns else pl.lit(default)

    mixer = pl.col("model.mixer")
    e2e = mixer == "ttt_e2e"
    heads = col("model.fast_heads", 0).cast(pl.Int64, strict=False).fill_null(0)
    all_layers = col("model.ttt_layers", None) == col("model.layers", None)
    return frame.with_columns(
        pl.when(e2e & (col("ttt.meta", True) == False))  # noqa: E712
        .then(pl.lit("ttt_e2e (meta off)"))
        .when(e2e & (heads > 0) & all_layers.fill_null(False))
        .then(pl.lit(MULTIHEAD))
        .when(e2e & (heads > 0))
        .then(pl.lit("ttt_e2e (multi-head)"))
        .when((mixer == "ttt_kvb") & (col("model.kvb_output", "query") == "key"))
        .then(pl.lit(KVB_SIMPLIFIED))
        .otherwise(mixer)
        .alias("method")
    )


def finished(frame: pl.DataFrame, value: str = LOSS) -> pl.DataFrame:
    if frame.is_empty() or value not in frame.columns or "outcome" not in frame.columns:
        return frame.clear()
    return frame.filter((pl.col("outcome") == "finished") & pl.col(value).is_not_null())


# Knobs that a sweep stage changes by design (a context-extension stage sets the length,
# batch, accumulation, steps, data and start point): they move with data.seq_len.
STAGE_KNOBS = {
    "data.seq_len",
    "data.batch_size",
    "train.grad_accum",
    "train.steps",
    "data.source",
    "train.init_from",
    "stage",
}
# Knobs that follow from a preset (every key any preset sets: its shapes, window, chunk,
# TTT layers, learning rate, steps, and its own batch and length): they move with the
# preset. The stage does not: one size is compared at one stage.
PRESET_KNOBS = {"preset", *preset_keys()}


def free_knobs(vary: list[str]) -> set[str]:
    """The knobs a figure lets move: those it varies, and those that move with them."""
    free = set(vary)
    if "data.seq_len" in free:
        free |= STAGE_KNOBS
    if "preset" in free:
        free |= PRESET_KNOBS
    return free


def hold_others(frame: pl.DataFrame, vary: list[str]) -> pl.DataFrame:
    """The runs that share the other methods' settings. A knob that acts on every method
    (length, steps, batch, learning rate, preset, stage) and that the figure does not let
    move (`free_knobs`) is held at the value most methods have. A knob of some methods
    only (window, chunk, inner LR, TTT layers: `ttt.config.ONLY_FOR`) is not held: each
    of its settings is a line of its own, named by `with_line`. Nothing is picked
    silently."""
    free = free_knobs(vary)
    for knob in KNOBS:
        if knob in free or knob in ONLY_FOR or knob not in frame.columns or frame.is_empty():
            continue
        frame = frame.filter(pl.col(knob).eq_missing(_shared_value(frame, knob)))
    return with_line(frame, free)


def _shared_value(frame: pl.DataFrame, knob: str):
    """The value of `knob` that the most methods have runs at (then the most runs)."""
    counts = (
        frame.group_by(knob)
        .agg(pl.col("method").n_unique().alias("methods"), pl.len().alias("runs"))
        .sort(["methods", "runs"], descending=True, nulls_last=True)
    )
    return counts[knob][0]


def with_line(frame: pl.DataFrame, free=()) -> pl.DataFrame:
    """`line`: what one drawn line (or table row group) stands for: the method, then
    each of its own knobs (not among `free`) that varies among its runs, where the run
    is not at the method's most common value of it (`ttt_e2e b=64`); a knob whose values
    are equally common is named on every line (`ttt_e2e b=4 eta=0.1`)."""
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.String).alias("line"))
    knobs = [k for k in KNOBS if k in ONLY_FOR and k in frame.columns and k not in free
             and k != "ttt.meta"]  # fmt: skip
    modal = {}  # method -> knob -> its one most common value (None: a tie, or no variation)
    for (method,), g in frame.group_by("method", maintain_order=True):
        modal[method] = {}
        for k in knobs:
            counts = g[k].value_counts(sort=True)
            if counts.height > 1:
                tie = counts["count"][0] == counts["count"][1]
                modal[method][k] = None if tie else counts[k][0]
    labels = []
    for row in frame.iter_rows(named=True):
        base = modal[row["method"]]
        parts = [_knob_label(k, row[k]) for k in knobs if k in base and row[k] != base[k]]
        labels.append(" ".join([row["method"], *parts]))
    return frame.with_columns(pl.Series("line", labels, pl.String))


SHORT = {"model.window": "k", "ttt.chunk": "b", "ttt.inner_lr": "eta",
         "ttt.inner_lr_init": "eta0", "model.ttt_layers": "L"}  # fmt: skip


def _knob_label(knob: str, value) -> str:
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{SHORT.get(knob, knob.split('.')[-1])}={shown}"


def aggregate(frame: pl.DataFrame, by: list[str], value: str = LOSS) -> pl.DataFrame:
    """Seed mean with min/max over the runs that share `by` (and their `line`, where the
    frame has lines), with the names of those runs."""
    if "line" in frame.columns and "method" in by and "line" not in by:
        by = [*by[: by.index("method") + 1], "line", *by[by.index("method") + 1 :]]
    names = (
        [pl.col("run_name").unique().sort().str.join(", ").alias("run_names")]
        if "run_name" in frame.columns
        else []
    )
    return (
        frame.group_by(by)
        .agg(
            pl.col(value).mean().alias("mean"),
            pl.col(value).min().alias("min"),
            pl.col(value).max().alias("max"),
            pl.len().alias("runs"),
            *names,
        )
        .sort(by)
    )


def delta_to_full(table: pl.DataFrame, on: list[str]) -> pl.DataFrame:
    """Each method's mean minus full attention's at the same `on` values."""
    full = table.filter(pl.col("method") == "full").select(*on, pl.col("mean").alias("full"))
    return (
        table.filter(pl.col("method") != "full")
        .join(full, on=on, how="inner")
        .with_columns(
            (pl.col("mean") - pl.col("full")).alias("delta"),
            (pl.col("min") - pl.col("full")).alias("delta_min"),
            (pl.col("max") - pl.col("full")).alias("delta_max"),
        )
    )


def _held(data: Data, x: str, methods=None, vary_extra=()) -> pl.DataFrame | None:
    """The finished runs a figure over `x` draws: one setting per method (`hold_others`)."""
    frame = finished(data.runs)
    if frame.is_empty() or x not in frame.columns:
        return None
    if methods is not None:
        frame = frame.filter(pl.col("method").is_in(methods))
    return hold_others(frame, [x, *vary_extra]).filter(pl.col(x).is_not_null())


def _sweep_figure(data: Data, x: str, methods=None, vary_extra=()) -> pl.DataFrame | None:
    frame = _held(data, x, methods, vary_extra)
    if frame is None:
        return None
    table = aggregate(frame, ["method", *vary_extra, x])
    if table.is_empty() or table[x].n_unique() < 2:
        return None
    return table


def context_length(data: Data):
    """Fig 1 left / Fig 9: loss against context length, and each method minus full
    attention from paired runs (same seed), with the pairs' bootstrap interval; per row
    its context use (`build_all` adds where its loss sits among the corpus floors)."""
    table = _sweep_figure(data, "data.seq_len")
    if table is None or "full" not in table["method"].to_list():
        return None
    held = _held(data, "data.seq_len")
    delta = paired_delta(held, "full", ["data.seq_len"], LOSS, se=LOSS_SE)
    on = ["method", "line", "data.seq_len"]
    table = table.join(delta, on=on, how="left")
    return table.join(context_use(held, on), on=on, how="left")


def context_use(frame: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per group: the runs' mean context use (`ttt.train.evaluate`) and the standard
    error of that mean from their evaluations, sqrt(sum se^2) / runs."""
    if "context_use" not in frame.columns:
        return (
            frame.select(by)
            .unique()
            .with_columns(
                pl.lit(None, pl.Float64).alias("context_use"),
                pl.lit(None, pl.Float64).alias("context_use_se"),
            )
        )
    se = pl.col("context_use_se") if "context_use_se" in frame.columns else pl.lit(None)
    return frame.group_by(by).agg(
        pl.col("context_use").mean(),
        ((se.cast(pl.Float64) ** 2).sum().sqrt() / pl.len()).alias("context_use_se"),
    )


def with_regime(table: pl.DataFrame, data: Data, value: str = "mean") -> pl.DataFrame:
    """`vs_floors`: where each row's loss sits among the corpus floors (`above bigram`,
    ...; `ttt.data.floors.Floors.regime`), for a store on one corpus; null otherwise."""
    floors = data.floors()
    if len(floors) != 1 or value not in table.columns:
        return table.with_columns(pl.lit(None, pl.String).alias("vs_floors"))
    (f,) = floors.values()
    marks = [f.regime(v) for v in table[value].to_list()]
    return table.with_columns(pl.Series("vs_floors", marks, pl.String))


def evaluated_context_length(data: Data):
    """Loss against context length of evaluated runs: `ttt eval RUN --seq-len T
    --tracking-uri` or a `task: eval` sweep (e.g. over imported released models). One
    line per evaluated run (`model`: its directory's name)."""
    frame = finished(data.evals)
    if frame.is_empty() or "data.seq_len" not in frame.columns:
        return None
    names = [
        pl.col(c).cast(pl.String).str.strip_chars_end("/").str.split("/").list.last()
        for c in ("eval.run", "train.init_from")
        if c in frame.columns
    ]
    frame = frame.with_columns(pl.coalesce(names).alias("model"))
    table = aggregate(frame, ["model", "method", "data.seq_len"])
    return table if table["data.seq_len"].n_unique() >= 2 else None


def niah(data: Data):
    """Table 2: needle-in-a-haystack accuracy against context length, per task and method
    (`ttt eval RUN --task niah --tracking-uri` runs)."""
    frame = with_method(runs(data.tracking_uri, data.experiments, "niah"))
    frame = finished(frame, "niah_accuracy")
    if frame.is_empty():
        return None
    return aggregate(frame, ["niah.task", "method", "data.seq_len"], "niah_accuracy")


# Table 1 from SWA to TTT-E2E, each rung with the name the paper's table gives it.
LADDER = {
    "swa": "swa_k8k",
    "ttt_kvb": "ttt_kvb",
    KVB_SIMPLIFIED: "ttt_kvb_simplified_output",
    MULTIHEAD: "ttt_e2e_all_layers_multihead",
    "ttt_e2e": "ttt_e2e",
}


def ladder(data: Data, paper: pl.DataFrame | None = None):
    """Table 1: each rung's final loss (seed mean, min, max) in the paper's order, its
    difference to SWA's (paired by seed, with a bootstrap interval), and the paper's 760M
    number for the rung beside it. None without SWA, the rung the others are read from."""
    frame = finished(data.runs)
    if frame.is_empty():
        return None
    frame = hold_others(frame.filter(pl.col("method").is_in(list(LADDER))), [])
    table = aggregate(frame, ["method"])
    if table.height < 2:
        return None
    order = pl.DataFrame(
        {"method": list(LADDER), "rung": range(len(LADDER)), "variant": list(LADDER.values())}
    )
    table = order.join(table, on="method", how="inner").sort("rung")
    if "swa" not in table["method"].to_list():  # Table 1 is read as steps from SWA
        return None
    delta = paired_delta(frame, "swa", [], LOSS, se=LOSS_SE)
    table = table.join(delta, on=["method", "line"], how="left")
    if paper is not None:
        table = table.join(paper.rename({"loss": "paper_loss"}), on="variant", how="left")
    return table


def window(data: Data):
    """Fig 4 left: loss against the window k (full attention as a reference line)."""
    table = _sweep_figure(data, "model.window", methods=["swa", "ttt_e2e"])
    return None if table is None else _with_full_reference(data, table, "model.window")


def chunk(data: Data):
    """Fig 4 middle: TTT-E2E loss against the chunk b; full and SWA as reference lines."""
    table = _sweep_figure(data, "ttt.chunk", methods=["ttt_e2e"])
    return (
        None if table is None else _with_full_reference(data, table, "ttt.chunk", ("full", "swa"))
    )


def _with_full_reference(data: Data, table: pl.DataFrame, x: str, refs=("full",)):
    """`refs` (methods the figure's knob does not act on) as rows with no `x`: the
    drawing's horizontal reference lines."""
    frame = finished(data.runs).filter(pl.col("method").is_in(list(refs)))
    if frame.is_empty():
        return table
    ref = aggregate(hold_others(frame, []), ["method"])
    ref = ref.with_columns(pl.lit(None, table.schema[x]).alias(x))
    return pl.concat([table, ref.select(table.columns)], how="vertical_relaxed")


def ttt_layers(data: Data):
    """Fig 4 right: loss minus full attention's against context length, per TTT-layer count."""
    frame = finished(data.runs)
    if frame.is_empty() or "model.ttt_layers" not in frame.columns:
        return None
    vary = ["data.seq_len", "model.ttt_layers"]
    # Held first: TTT layers that only follow a preset (a size sweep) are not this figure.
    frame = hold_others(frame.filter(pl.col("method").is_in(["ttt_e2e", "full"])), vary)
    ttt = frame.filter(pl.col("method") == "ttt_e2e")
    full = frame.filter(pl.col("method") == "full")
    if ttt["model.ttt_layers"].n_unique() < 2 or full.is_empty():
        return None
    table = aggregate(frame, ["method", "model.ttt_layers", "data.seq_len"])
    full_t = table.filter(pl.col("method") == "full").select(
        "data.seq_len", pl.col("mean").alias("full")
    )
    out = (
        table.filter(pl.col("method") == "ttt_e2e")
        .join(full_t, on="data.seq_len")
        .with_columns((pl.col("mean") - pl.col("full")).alias("delta"))
    )
    return None if out.is_empty() else out


def model_size(data: Data):
    """Fig 5 left: loss minus full attention's against model size (non-embedding params)."""
    # deferred: ttt.model's package loads JAX; only Fig 5 needs parameter counts
    from ttt.model.params import param_counts

    table = _sweep_figure(data, "preset")
    if table is None or "full" not in table["method"].to_list():
        return None
    sizes = {
        p: param_counts(load_config(p, ["model.mixer=full"]).model)["non_embedding"]
        for p in table["preset"].unique().to_list()
    }
    out = delta_to_full(table, ["preset"]).with_columns(
        pl.col("preset").replace_strict(sizes, return_dtype=pl.Int64).alias("params")
    )
    return out.sort("params")


def training_tokens(data: Data):
    """Fig 5 right: loss minus full attention's against training tokens."""
    frame = finished(data.runs)
    need = {"train.steps", "data.batch_size", "data.seq_len"}
    if frame.is_empty() or not need <= set(frame.columns):
        return None
    frame = frame.with_columns(
        (pl.col("train.steps") * pl.col("data.batch_size") * pl.col("data.seq_len")).alias("tokens")
    )
    frame = hold_others(frame, ["train.steps", "data.batch_size"])
    table = aggregate(frame, ["method", "tokens"])
    if table["tokens"].n_unique() < 2 or "full" not in table["method"].to_list():
        return None
    return delta_to_full(table, ["tokens"])


def run_flops_per_token(row: dict) -> float:
    """Training FLOPs per token of a tracked run (`ttt.train.flops`, the count behind MFU),
    from its logged config."""
    # deferred: ttt.train's package loads JAX; only the compute figure needs FLOPs
    from ttt.train.flops import flops_per_token

    keys = {k: v for k, v in row.items() if k.split(".")[0] in SECTIONS and v is not None}
    cfg = load_config(row.get("preset") or "pico", keys)
    inner = cfg.model.mixer == "ttt_e2e" and cfg.ttt.meta
    return flops_per_token(cfg, training=True, inner=inner)


def compute(data: Data):
    """Training loss against training FLOPs per method (seed mean, min, max at each
    logged step of the first stage): the comparison at equal compute, beside the one at
    equal tokens.
    TTT-E2E spends more FLOPs per token than attention (the paper: 3.4x at 8K), so its
    line is stretched to the right by that ratio."""
    frame = finished(data.runs)
    if frame.is_empty() or "model.mixer" not in frame.columns:
        return None
    if "stage" in frame.columns:  # pre-training: a later stage starts from its checkpoints
        frame = frame.filter(pl.col("stage").is_null() | (pl.col("stage") == "main"))
    # steps are this figure's x (times FLOPs per step): methods may train for different
    # numbers of them (equal FLOPs, not equal steps)
    frame = hold_others(frame, ["train.steps"])
    if frame.is_empty() or frame["method"].n_unique() < 2:
        return None
    per_step = {
        row["run_id"]: run_flops_per_token(row) * row["data.batch_size"] * row["data.seq_len"]
        for row in frame.iter_rows(named=True)
    }
    hist = data.history(list(per_step), ["loss"])
    if hist.is_empty():
        return None
    hist = hist.join(frame.select("run_id", "method", "line"), on="run_id").with_columns(
        (pl.col("step") * pl.col("run_id").replace_strict(per_step, return_dtype=pl.Float64)).alias(
            "flops"
        ),
        pl.col("value").alias(LOSS),
    )
    by = ["method", "line", "step"]
    table = aggregate(hist, by, LOSS).join(hist.group_by(by).agg(pl.col("flops").mean()), on=by)
    return table.sort(by)


def token_index(data: Data):
    """Fig 6: loss by token index (log x), per method, averaged over sequences and seeds;
    and where full attention is in the store, each method minus it by token index, paired
    by seed with a bootstrap interval per log-spaced bin."""
    frame = finished(data.runs)
    if frame.is_empty():
        return None
    frame = hold_others(frame, [])
    nll = data.nll(frame["run_id"].to_list())
    if nll.is_empty():
        return None
    table = nll_by_token_index(nll.join(frame.select("run_id", "method", "line"), on="run_id"))
    table = table.join(binned_se(data, frame), on=["method", "line", "bin"], how="left")
    if "full" not in frame["method"].to_list() or "train.seed" not in frame.columns:
        return table
    # each run's log-binned NLL minus its full-attention twin's (same seed), by bin
    runs_ = frame.select("run_id", "method", "line", "train.seed")
    binned = (
        nll.with_columns(position_bin("position"))
        .group_by("run_id", "bin")
        .agg(pl.col("nll").mean())
        .join(runs_, on="run_id")
    )
    bins = data.bins(frame["run_id"].to_list())
    if not bins.is_empty():  # each run's own evaluation error of the bin
        binned = binned.join(bins.select("run_id", "bin", "se"), on=["run_id", "bin"], how="left")
    delta = paired_delta(binned, "full", ["bin"], "nll", se="se")
    return table.join(delta, on=["method", "line", "bin"], how="left")


def nll_by_token_index(nll: pl.DataFrame) -> pl.DataFrame:
    """Per (method, line, position): mean, min and max NLL over runs and sequences, and
    the log-binned mean the figure draws. Also the table of one run's NLL artifact."""
    if "line" not in nll.columns:
        nll = nll.with_columns(pl.col("method").alias("line"))
    table = (
        nll.group_by(["method", "line", "position"])
        .agg(
            pl.col("nll").mean().alias("mean"),
            pl.col("nll").min().alias("min"),
            pl.col("nll").max().alias("max"),
            pl.len().alias("runs"),
        )
        .sort(["method", "line", "position"])
    )
    # Per-position means are noisy on a log axis; the drawn line averages log-spaced bins
    # (four per octave) of them.
    table = table.with_columns(position_bin("position"))
    return table.with_columns(pl.col("mean").mean().over(["line", "bin"]).alias("binned"))


def position_bin(column: str) -> pl.Expr:
    """`ttt.stats.log_bin` as a Polars expression: the bin the evaluation's standard
    errors are recorded in (four per octave)."""
    octaves = (pl.col(column) + 1).log(2) * BINS_PER_OCTAVE
    return octaves.floor().cast(pl.Int64).alias("bin")


def binned_se(data: Data, frame: pl.DataFrame) -> pl.DataFrame:
    """Per (method, bin): the standard error of the runs' mean binned NLL from the
    evaluations' own sampling error, sqrt(sum se^2) / runs (`binned_se`); empty where
    no run recorded its bins."""
    bins = data.bins(frame["run_id"].to_list())
    if bins.is_empty():
        schema = {"method": pl.String, "line": pl.String, "bin": pl.Int64}
        return pl.DataFrame(schema={**schema, "binned_se": pl.Float64})
    return (
        bins.join(frame.select("run_id", "method", "line"), on="run_id")
        .group_by("method", "line", "bin")
        .agg(((pl.col("se") ** 2).sum().sqrt() / pl.len()).alias("binned_se"))
    )


def inner_lr_meta(data: Data):
    """This product's ablation: loss against the inner LR, meta-learning on and off."""
    frame = finished(data.runs)
    if frame.is_empty() or "ttt.inner_lr" not in frame.columns:
        return None
    frame = frame.filter(pl.col("model.mixer") == "ttt_e2e")
    if frame.is_empty():
        return None
    frame = hold_others(frame, ["ttt.inner_lr", "ttt.meta"])
    table = aggregate(frame, ["method", "ttt.inner_lr"])
    if table["ttt.inner_lr"].n_unique() < 2 and table["method"].n_unique() < 2:
        return None
    return table


def latency(data: Data, mode: str):
    """Fig 1 right (prefill) / Fig 8 (train): seconds per 1K tokens against context length;
    decode: milliseconds per generated token against the context before it. From `ttt
    bench ... --tracking-uri` runs."""
    bench = data.bench()
    if bench.is_empty() or "mode" not in bench.columns:
        return None
    frame = bench.filter(pl.col("mode") == mode)
    if frame.is_empty():
        return None
    if mode == "decode":
        value = (pl.col("step_s") * 1000).alias("ms_per_token")
    else:
        value = (pl.col("step_s") / (pl.col("seq_len") * pl.col("batch") / 1024)).alias("s_per_1k")
    frame = frame.with_columns(value)
    return aggregate(frame, ["mixer", "preset", "seq_len"], value.meta.output_name()).rename(
        {"mixer": "method"}
    )


def curves(data: Data):
    """Loss against step, one line per trial, for every sweep."""
    frame = data.runs
    if frame.is_empty():
        return None
    hist = data.history(frame["run_id"].to_list(), ["loss"])
    if hist.is_empty():
        return None
    return hist.join(frame.select("run_id", "experiment", "run_name", "outcome"), on="run_id")


def recall(data: Data):
    """The recall task (`ttt.data.recall`): exact-match accuracy against the distance
    from a pair to its query, one line per method and variant (seed mean, min and max),
    from the trials' final evaluations (`recall_accuracy_dN`: distances N..2N-1)."""
    frame = finished(data.runs)
    if frame.is_empty() or "data.source" not in frame.columns:
        return None
    frame = frame.filter(pl.col("data.source") == "recall")
    cols = [c for c in frame.columns if c.startswith("recall_accuracy_d")]
    if frame.is_empty() or not cols:
        return None
    frame = with_line(frame)
    keep = ["run_id", "run_name", "method", "line", "model.window", "model.layers",
            "ttt.chunk", "recall.values", "recall.pairs", "train.seed"]  # fmt: skip
    long = (
        frame.select([c for c in keep if c in frame.columns] + cols)
        .unpivot(on=cols, index=[c for c in keep if c in frame.columns], value_name="accuracy")
        .with_columns(
            pl.col("variable")
            .str.strip_prefix("recall_accuracy_d")
            .cast(pl.Int64)
            .alias("distance_lo")
        )
        .drop("variable")
        .drop_nulls("accuracy")
    )
    by = ["method", "line", "distance_lo"]
    table = (
        long.group_by(by)
        .agg(
            pl.col("accuracy").mean().alias("mean"),
            pl.col("accuracy").min().alias("min"),
            pl.col("accuracy").max().alias("max"),
            pl.len().alias("runs"),
            pl.col("run_name").unique().sort().str.join(", ").alias("run_names"),
            pl.col("model.window").first().alias("window"),
            # how far attention reaches: a second layer relays one window further
            (pl.col("model.window") * pl.col("model.layers")).first().alias("reach"),
            pl.col("ttt.chunk").first().alias("chunk"),
            (1.0 / pl.col("recall.values").first()).alias("chance"),
            pl.struct("recall.pairs", "recall.values").first().alias("_task"),
        )
        .sort(by)
    )
    seen = [RecallTask(pairs=t["recall.pairs"], values=t["recall.values"]).seen_guess
            for t in table["_task"].to_list()]  # fmt: skip
    return table.drop("_task").with_columns(pl.Series("seen_guess", seen, pl.Float64))
