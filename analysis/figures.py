"""Matplotlib drawings of the recipes' tidy tables, and `build_all` behind `ttt plots`.

Conventions follow the paper: context axes are log2 and labelled 8K..128K, differences
are to full attention with the zero line drawn, and the paper's published numbers appear
as labelled reference markers (black outlines) where it printed any.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# No matplotlib.use(): a notebook keeps its inline backend, and a machine without a
# display falls back to Agg by itself.
import matplotlib.pyplot as plt
import polars as pl
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

from analysis import recipes
from analysis.recipes import Data
from analysis.style import (
    COLORS,
    LINESTYLES,
    PAPER_METHOD,
    context_axis,
    floor_lines,
    interval_note,
    lines,
    paper,
    paper_markers,
    references,
    within_noise,
)


def draw(name: str, table: pl.DataFrame):
    return FIGURES[name].draw(table)


def render(name: str, table: pl.DataFrame, data: Data):
    """`draw`, then what the store adds: the corpus floors on each axis of absolute loss
    (with the legend redrawn to hold them)."""
    fig = draw(name, table)
    floors = data.floors()
    where = FIGURES[name].absolute
    if floors and where:
        for ax in fig.axes if where == "all" else [fig.axes[i] for i in where]:
            floor_lines(ax, floors)
            ax.legend(fontsize=6)
    return fig


def _paper_loss_by_context(ax) -> pl.DataFrame:
    """The paper's 3B loss by context length (Fig 9) as markers on `ax`; returns it."""
    ref = paper("fig9_loss_by_context.csv").filter(pl.col("method").is_in(list(PAPER_METHOD)))
    for m, g in ref.group_by("method"):
        name = PAPER_METHOD[m[0]]
        paper_markers(ax, g["context"], g["loss"], f"paper 3B: {name}", name)
    return ref


def _context_length(t):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lines(a, t, "data.seq_len")
    ref = _paper_loss_by_context(a)
    context_axis(a, [*t["data.seq_len"].to_list(), *ref["context"].to_list()])
    a.set(xlabel="context length (tokens)", ylabel="eval loss (nats/token)", title="Loss")
    d = t.filter(pl.col("delta").is_not_null())
    lines(b, d, "data.seq_len", "delta", "delta_lo", "delta_hi")
    within_noise(b, d, "data.seq_len")
    full = ref.filter(pl.col("method") == "full_attention").select(
        "context", pl.col("loss").alias("f")
    )
    pd = ref.join(full, on="context").filter(pl.col("method") != "full_attention")
    for m, g in pd.group_by("method"):
        paper_markers(
            b,
            g["context"],
            g["loss"] - g["f"],
            f"paper 3B: {PAPER_METHOD[m[0]]}",
            PAPER_METHOD[m[0]],
        )
    b.axhline(0, color="black", lw=0.8)
    context_axis(b, [*d["data.seq_len"].to_list(), *pd["context"].to_list()])
    b.set(
        xlabel="context length (tokens)",
        ylabel="loss - full attention (nats)",
    )
    b.set_title(f"Loss difference to full attention\n({interval_note(d)})", fontsize=9)
    for ax in (a, b):
        ax.legend(fontsize=7)
    return fig


def _ablation(x: str, xlabel: str, log2: bool, paper_panel: str | None):
    """This store's lines, and the paper's 760M points in a panel of their own: they are
    another model's losses on another corpus, so never on this store's axis."""

    def f(t):
        pts = paper("ablation_points.csv").filter(pl.col("panel") == paper_panel)
        pts = pts.filter(pl.col("method").is_in(["ttt_e2e", "full_attention"]))
        side = bool(paper_panel) and not pts.is_empty()
        fig, axes = plt.subplots(1, 2 if side else 1, figsize=(11 if side else 6, 4),
                                 squeeze=False)  # fmt: skip
        ax = axes[0][0]
        lines(ax, t, x)
        references(ax, t, x)
        if log2:
            context_axis(ax, t.filter(pl.col(x).is_not_null())[x].to_list())
        ax.set(xlabel=xlabel, ylabel="eval loss (nats/token)", title="This store")
        ax.legend(fontsize=7, loc="center right")
        if side:
            pa = axes[0][1]
            for m, g in pts.group_by("method"):
                name = PAPER_METHOD[m[0]]
                paper_markers(pa, g["value"], g["loss"], f"paper 760M: {name}", name)
            if log2:
                context_axis(pa, pts["value"].to_list())
            pa.set(xlabel=xlabel, ylabel="loss (nats per Llama-3 token)",
                   title="The paper, 760M, DCLM 8K: another scale")  # fmt: skip
            pa.legend(fontsize=7)
        return fig

    return f


def _ttt_layers(t):
    fig, ax = plt.subplots(figsize=(6, 4))
    lines(
        ax,
        t,
        "data.seq_len",
        "delta",
        group="model.ttt_layers",
        label_fmt=lambda n: f"{n} TTT layers",
    )
    ax.axhline(0, color="black", lw=0.8)
    context_axis(ax, t["data.seq_len"].to_list())
    ax.set(xlabel="context length (tokens)", ylabel="loss - full attention (nats)")
    ax.legend(fontsize=7)
    return fig


def _delta(x: str, xlabel: str):
    def f(t):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines(ax, t, x, "delta", "delta_min", "delta_max")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ticks = sorted(set(t[x].to_list()))
        ax.set_xticks(ticks, [f"{v / 1e6:.0f}M" if v < 1e9 else f"{v / 1e9:.1f}B" for v in ticks])
        ax.minorticks_off()
        ax.set(xlabel=xlabel, ylabel="loss - full attention (nats)")
        ax.legend(fontsize=7)
        return fig

    return f


def draw_token_index(t):
    paired = "delta" in t.columns and t["delta"].is_not_null().any()
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4), squeeze=False)
    ax = axes[0][0]
    group = "line" if "line" in t.columns else "method"
    per_method: dict = {}
    for key, g in t.group_by(group, maintain_order=True):
        g = g.filter(pl.col("position") > 0).sort("position")
        method = g["method"][0]
        color = COLORS.get(method)
        k = per_method[method] = per_method.get(method, -1) + 1  # its lines differ in style
        ax.plot(g["position"], g["mean"], color=color, lw=0.5, alpha=0.3)
        line = ax.plot(g["position"], g["binned"], label=key[0], color=color, lw=1.5,
                       ls=LINESTYLES[k % len(LINESTYLES)])[0]  # fmt: skip
        if "binned_se" in g.columns and g["binned_se"].is_not_null().any():
            half = 1.96 * g["binned_se"].fill_null(0.0)
            ax.fill_between(g["position"], g["binned"] - half, g["binned"] + half,
                            color=line.get_color(), alpha=0.25, lw=0)  # fmt: skip
    ax.set_xscale("log")
    ax.set(xlabel="token index (log scale; position 0 not drawn)", ylabel="NLL (nats/token)")
    ax.set_title("Loss by token index\n(faint: per position; bold: log-binned; band: 95% over "
                 "held-out sequences)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    if paired:  # one point per bin, at the bin's first position
        d = (
            t.filter(pl.col("delta").is_not_null() & (pl.col("position") > 0))
            .group_by(
                ["method", group, "bin"] if group != "method" else ["method", "bin"],
                maintain_order=True,
            )  # fmt: skip
            .agg(
                pl.col("position").min(),
                pl.col("delta", "delta_lo", "delta_hi", "runs", "pairs").first(),
            )
        )
        b = axes[0][1]
        lines(b, d, "position", "delta", "delta_lo", "delta_hi")
        b.axhline(0, color="black", lw=0.8)
        b.set_xscale("log")
        b.set(xlabel="token index (log scale; position 0 not drawn)",
              ylabel="NLL - full attention's (nats)")  # fmt: skip
        b.set_title(f"Difference to full attention\n({interval_note(d)})", fontsize=9)
        b.legend(fontsize=7)
    return fig


def _ladder(t):
    """Table 1 as two panels of rungs: this store's loss minus SWA's (paired by seed, with
    its 95% bootstrap interval) and the paper's 760M numbers minus its SWA's."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    names = t["line"].to_list() if "line" in t.columns else t["method"].to_list()
    x = list(range(len(names)))
    colors = [COLORS.get(n, "gray") for n in t["method"].to_list()]
    paired = t.with_columns(pl.col("delta").fill_null(0.0), pl.col("delta_lo").fill_null(0.0),
                            pl.col("delta_hi").fill_null(0.0))  # fmt: skip
    err = [paired["delta"] - paired["delta_lo"], paired["delta_hi"] - paired["delta"]]
    a.errorbar(x, paired["delta"], yerr=err, fmt="none", ecolor="black", capsize=4)
    a.scatter(x, paired["delta"], c=colors, s=60, zorder=3)
    within_noise(a, paired.with_columns(pl.Series("rung_x", x)).filter(pl.col("method") != "swa"),
                 "rung_x")  # fmt: skip
    rungs = t.filter(pl.col("method") != "swa")
    a.set(ylabel="loss minus SWA's (nats)")
    a.set_title(f"This store\n({interval_note(rungs)})", fontsize=9)
    if "paper_loss" in t.columns and t["paper_loss"].is_not_null().any():
        p_swa = t.filter(pl.col("method") == "swa")["paper_loss"]
        ref = p_swa[0] if p_swa.len() else 0.0
        b.scatter(x, t["paper_loss"] - ref, c=colors, s=60, marker="D")
        for i, v in zip(x, t["paper_loss"], strict=True):
            if v is not None:
                b.annotate(f"{v:.3f}", (i, v - ref), textcoords="offset points", xytext=(0, 6),
                           ha="center", fontsize=7)  # fmt: skip
    b.set(ylabel="loss minus SWA's (nats)", title="The paper, 760M, DCLM 8K (Table 1)")
    for ax in (a, b):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=7)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    return fig


def _one_axis(x: str, xlabel: str, ylabel: str, title: str, log: bool = True, unit=None):
    """One panel: a line per method against `x` (log scale), seed bands. `unit`: the x
    ticks in engineering notation (2 PFLOP), major ticks only, so that none collide."""

    def f(t):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines(ax, t, x)
        if log:
            ax.set_xscale("log")
        if unit:
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(EngFormatter(unit=unit, places=0))
            ax.xaxis.set_minor_formatter(NullFormatter())
        seeds = int(t["runs"].max()) if "runs" in t.columns and t.height else 0
        band = "band: min-max over seeds" if seeds > 1 else "one seed: no band"
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.set_title(f"{title}\n({band})", fontsize=9)
        ax.legend(fontsize=7)
        return fig

    return f


def _latency(title: str, paper_csv: str | None, ylabel: str = "seconds per 1K tokens"):
    def f(t):
        fig, ax = plt.subplots(figsize=(6, 4))
        t = t.with_columns((pl.col("method") + " " + pl.col("preset")).alias("label"))
        lines(ax, t, "seq_len", group="label")
        vals = t["seq_len"].to_list()
        if paper_csv:
            ref = paper(paper_csv)
            for m, g in ref.group_by("method"):
                paper_markers(
                    ax,
                    g["context"],
                    g["prefill_s_per_1k_tokens"],
                    f"paper 3B H100: {PAPER_METHOD.get(m[0], m[0])}",
                )
            vals += ref["context"].to_list()
        context_axis(ax, vals)
        ax.set(xlabel="context length (tokens)", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)
        return fig

    return f


def _curves(t):
    exps = t["experiment"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(exps), figsize=(6 * len(exps), 4), squeeze=False)
    for ax, exp in zip(axes[0], exps, strict=True):
        for key, g in t.filter(pl.col("experiment") == exp).group_by(
            "run_name", maintain_order=True
        ):
            ax.plot(g["step"], g["value"], label=key[0], lw=1)
        ax.set(xlabel="step", ylabel="training loss (nats/token)", title=exp)
        ax.legend(fontsize=6)
    return fig


def _evaluated_context_length(t):
    """Two panels, not one axis: a run's loss is in nats per token of *its* tokenizer (a
    byte-level model's bytes are not the paper's Llama-3 tokens), so the paper's numbers
    sit beside the runs' as a shape to compare, never on the same scale."""
    fig, (ax, pa) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines(ax, t, "data.seq_len", group="model")
    context_axis(ax, t["data.seq_len"].to_list())
    ax.set(
        xlabel="context length (tokens of the run's tokenizer)",
        ylabel="eval loss (nats per token of the run's tokenizer)",
        title="Evaluated runs: loss by context length",
    )
    ax.legend(fontsize=7)
    ref = _paper_loss_by_context(pa)
    context_axis(pa, ref["context"].to_list())
    pa.set(
        xlabel="context length (Llama-3 tokens)",
        ylabel="loss (nats per Llama-3 token)",
        title="The paper, 3B (Fig 9): another unit",
    )
    pa.legend(fontsize=7)
    return fig


def _niah(t):
    tasks = sorted(t["niah.task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    ref = paper("table2_niah.csv")
    for ax, task in zip(axes[0], tasks, strict=True):
        g = t.filter(pl.col("niah.task") == task)
        lines(ax, g, "data.seq_len")
        r = ref.filter(pl.col("task") == task)
        for m, rg in r.group_by("method"):
            name = PAPER_METHOD.get(m[0], m[0])
            paper_markers(ax, rg["context"], rg["accuracy"], f"paper 3B: {name}", name)
        context_axis(ax, [*g["data.seq_len"].to_list(), *r["context"].to_list()])
        ax.set(xlabel="context length (tokens)", ylabel="accuracy", title=task, ylim=(-0.05, 1.05))
        ax.legend(fontsize=6)
    return fig


def _recall(t):
    """Accuracy by distance, a line per method and setting with its seed range as a band, chance
    (1/recall.values), the window, and each TTT variant's chunk."""
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    for (name,), g in t.group_by("line", maintain_order=True):
        g = g.sort("distance_lo")
        line = ax.plot(g["distance_lo"], g["mean"], marker="o", lw=1.2, label=name)[0]
        if g["runs"].max() > 1:
            ax.fill_between(g["distance_lo"], g["min"], g["max"], alpha=0.15,
                            color=line.get_color())  # fmt: skip
    chance = t["chance"].drop_nulls()
    if chance.len():
        ax.axhline(chance[0], color="gray", ls=":", label=f"chance {chance[0]:.3f}")
    seen = t["seen_guess"].drop_nulls()
    if seen.len():
        ax.axhline(seen[0], color="gray", ls="-.", lw=0.8,
                   label=f"a guess among the sequence's values {seen[0]:.3f}")  # fmt: skip
    windowed = t.filter(pl.col("method") != "full")
    for w in windowed["window"].drop_nulls().unique().to_list():
        ax.axvline(w, color="black", ls="--", lw=1, label=f"window {w}")
    for r in windowed["reach"].drop_nulls().unique().to_list():
        ax.axvline(r, color="black", ls="-", lw=0.8, alpha=0.5,
                   label=f"attention's reach {r} (layers x window)")  # fmt: skip
    chunks = t.filter(pl.col("method").str.starts_with("ttt_e2e"))["chunk"].drop_nulls()
    for b in sorted(chunks.unique().to_list()):
        ax.axvline(b, color="tab:green", ls=":", lw=1, label=f"chunk {b}")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(t["distance_lo"].to_list()))
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.minorticks_off()
    seeds = int(t["runs"].max())
    band = "band: min-max over seeds" if seeds > 1 else "one seed: no band"
    ax.set(xlabel="distance from a pair to its query (tokens, log2 buckets)",
           ylabel="exact-match accuracy", ylim=(-0.03, 1.03),
           title=f"Recall by distance ({band})")  # fmt: skip
    # beside the axes: at the top, where every method that recalls lies, it hid the lines
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class Figure:
    """One paper figure: the recipe that builds its tidy table from tracked runs, the
    drawing of that table, and the sweep spec (or command) whose runs it needs."""

    name: str
    recipe: Callable[[Data], pl.DataFrame | None]
    draw: Callable[[pl.DataFrame], Any]
    hint: str
    # its axes (indices, or "all") of absolute loss: they get the corpus floors
    absolute: tuple[int, ...] | str = ()


# The registry: adding a figure is one entry here.
FIGURES: dict[str, Figure] = {
    f.name: f
    for f in [
        Figure(
            "fig1_context_length",
            recipes.context_length,
            _context_length,
            "sweeps/context_scaling.yaml (or sweeps/small_scale.yaml on a CPU)",
            absolute=(0,),
        ),
        Figure(
            "eval_context_length",
            recipes.evaluated_context_length,
            _evaluated_context_length,
            "ttt eval RUN --seq-len T --seq-len 2T ... --tracking-uri URI -e evals",
        ),
        Figure(
            "fig1_prefill_latency",
            lambda d: recipes.latency(d, "prefill"),
            _latency("Prefill latency", "latency_h100_3b.csv"),
            "ttt bench prefill PRESET data.seq_len=T --tracking-uri URI",
        ),
        Figure(
            "table2_niah",
            recipes.niah,
            _niah,
            "ttt eval RUN --task niah --seq-len T ... --tracking-uri URI",
        ),
        Figure(
            "decode_latency",
            lambda d: recipes.latency(d, "decode"),
            _latency("Decode latency", None, "ms per generated token"),
            "ttt bench decode PRESET --contexts 1024,4096,16384 --tracking-uri URI",
        ),
        Figure(
            "fig8_train_latency",
            lambda d: recipes.latency(d, "train"),
            _latency("Training latency", None),
            "ttt bench train PRESET data.seq_len=T --tracking-uri URI",
        ),
        Figure(
            "table1_ladder",
            lambda d: recipes.ladder(d, paper("table1_760m.csv")),
            _ladder,
            "sweeps/table1_ladder.yaml (or sweeps/ladder_small.yaml on a CPU)",
        ),
        Figure(
            "fig4_window",
            recipes.window,
            _ablation("model.window", "sliding window k (tokens)", True, "window"),
            "sweeps/window_ablation.yaml (or sweeps/quickstart.yaml)",
            absolute=(0,),
        ),
        Figure(
            "fig4_chunk",
            recipes.chunk,
            _ablation("ttt.chunk", "chunk length b (tokens)", True, "chunk"),
            "sweeps/chunk_ablation.yaml",
            absolute=(0,),
        ),
        Figure(
            "fig4_ttt_layers",
            recipes.ttt_layers,
            _ttt_layers,
            "sweeps/ttt_layers_ablation.yaml",
        ),
        Figure(
            "fig5_model_size",
            recipes.model_size,
            _delta("params", "non-embedding parameters"),
            "sweeps/model_size.yaml",
        ),
        Figure(
            "fig5_training_tokens",
            recipes.training_tokens,
            _delta("tokens", "training tokens"),
            "sweeps/model_size.yaml with a train.steps grid",
        ),
        Figure(
            "fig6_token_index",
            recipes.token_index,
            draw_token_index,
            "sweeps/quickstart.yaml (any sweep with full and ttt_e2e)",
            absolute=(0,),
        ),
        Figure(
            "inner_lr_meta",
            recipes.inner_lr_meta,
            _one_axis(
                "ttt.inner_lr",
                "inner learning rate eta (log scale)",
                "eval loss (nats/token)",
                "Inner LR, meta-learning on and off",
            ),
            "sweeps/inner_lr.yaml and sweeps/meta.yaml (or sweeps/quickstart.yaml)",
            absolute=(0,),
        ),
        Figure(
            "compute",
            recipes.compute,
            _one_axis(
                "flops",
                "training FLOPs (the project's count)",
                "training loss (nats/token)",
                "Loss at equal compute",
                unit="FLOP",
            ),
            "any sweep with two methods (sweeps/small_scale.yaml, sweeps/ladder_small.yaml)",
            absolute=(0,),
        ),
        Figure(
            "recall_by_distance",
            recipes.recall,
            _recall,
            "sweeps/recall_small.yaml (any sweep with data.source=recall)",
        ),
        Figure(
            "curves",
            recipes.curves,
            _curves,
            "any sweep",
            absolute="all",
        ),
    ]
}


def build_all(
    tracking_uri: str,
    out: Path,
    experiments: list[str] | None = None,
    formats=("png", "pdf"),
    only: list[str] | None = None,
):
    """Write every figure that has data; return (written {name: [paths]}, missing {name: hint})."""
    data = Data(tracking_uri, experiments)
    written, missing = {}, {}
    for name, figure in FIGURES.items():
        if only and name not in only:
            continue
        table = figure.recipe(data)
        if table is None or table.is_empty():
            missing[name] = figure.hint
            continue
        if figure.absolute:  # its table says which losses are above which floor
            table = recipes.with_regime(table, data)
        out.mkdir(parents=True, exist_ok=True)
        fig = render(name, table, data)
        fig.tight_layout()
        paths = []
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, dpi=130)
            paths.append(path)
        plt.close(fig)
        table_path = out / f"{name}.parquet"
        table.write_parquet(table_path)
        written[name] = [*paths, table_path]
    return written, missing
