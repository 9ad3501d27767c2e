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

from analysis import recipes
from analysis.recipes import Data

PAPER_DIR = Path(__file__).parent / "paper"
# The paper's method names -> the project's.
PAPER_METHOD = {
    "full_attention": "full",
    "swa": "swa",
    "hybrid_swa_full_5to1": "hybrid",
    "gated_deltanet": "gated_deltanet",
    "mamba2": "mamba2",
    "ttt_kvb": "ttt_kvb",
    "ttt_e2e": "ttt_e2e",
}
COLORS = {
    "full": "tab:blue",
    "swa": "tab:orange",
    "hybrid": "tab:brown",
    "gated_deltanet": "tab:purple",
    "mamba2": "tab:pink",
    "ttt_kvb": "tab:olive",
    recipes.KVB_SIMPLIFIED: "tab:cyan",
    recipes.MULTIHEAD: "tab:gray",
    "ttt_e2e": "tab:green",
    "ttt_e2e (meta off)": "tab:red",
}


def paper(name: str) -> pl.DataFrame:
    """A table the paper published (shipped with this package, see analysis/paper/)."""
    return pl.read_csv(PAPER_DIR / name)


def fmt_tokens(v: float) -> str:
    v = int(v)
    if v >= 1 << 20 and v % (1 << 20) == 0:
        return f"{v >> 20}M"
    return f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v)


def context_axis(ax, values) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted({float(v) for v in values})
    ax.set_xticks(ticks, [fmt_tokens(v) for v in ticks])
    ax.minorticks_off()


def lines(
    ax,
    table: pl.DataFrame,
    x: str,
    y: str = "mean",
    lo: str = "min",
    hi: str = "max",
    group: str = "method",
    label_fmt=str,
) -> None:
    for key, g in table.filter(pl.col(x).is_not_null()).group_by(group, maintain_order=True):
        name = key[0]
        g = g.sort(x)
        color = COLORS.get(name) if isinstance(name, str) else None
        ax.plot(g[x], g[y], marker="o", label=label_fmt(name), color=color)
        if lo in g.columns and "runs" in g.columns and g["runs"].max() > 1:
            ax.fill_between(g[x], g[lo], g[hi], alpha=0.2, color=color)


def within_noise(ax, table: pl.DataFrame, x: str) -> None:
    """Grey rings on paired differences that are within seed noise (their interval holds
    zero, or they are no larger than the store's seed spread), so none reads as an effect."""
    if "noise" not in table.columns:
        return
    noisy = table.filter(pl.col("noise"))
    if noisy.is_empty():
        return
    spread = table["seed_spread"].drop_nulls()
    what = f"within seed noise (spread {spread[0]:.3f})" if spread.len() else "within seed noise"
    ax.scatter(noisy[x], noisy["delta"], s=160, facecolor="none", edgecolor="gray", lw=1.5,
               zorder=6, label=what)  # fmt: skip


def references(ax, table: pl.DataFrame, x: str) -> None:
    """Rows with no x value (a method that ignores the swept knob) as horizontal lines."""
    for row in table.filter(pl.col(x).is_null()).iter_rows(named=True):
        ax.axhline(
            row["mean"],
            ls="--",
            color=COLORS.get(row["method"], "gray"),
            label=f"{row['method']} (reference)",
        )


PAPER_MARKER = {
    "full": "s",
    "swa": "^",
    "hybrid": "v",
    "gated_deltanet": "D",
    "mamba2": "P",
    "ttt_kvb": "X",
    "ttt_e2e": "*",
}


def paper_markers(ax, xs, ys, label: str, method: str | None = None) -> None:
    """Published values: hollow markers, shaped and outlined by method."""
    ax.scatter(
        xs,
        ys,
        marker=PAPER_MARKER.get(method, "D"),
        s=90,
        facecolor="none",
        edgecolor=COLORS.get(method, "black"),
        linewidths=1.5,
        zorder=5,
        label=label,
    )


def draw(name: str, table: pl.DataFrame):
    return FIGURES[name].draw(table)


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
        title="Loss difference to full attention (paired by seed, 95% CI)",
    )
    for ax in (a, b):
        ax.legend(fontsize=7)
    return fig


def _ablation(x: str, xlabel: str, log2: bool, paper_panel: str | None):
    def f(t):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines(ax, t, x)
        references(ax, t, x)
        vals = t.filter(pl.col(x).is_not_null())[x].to_list()
        if paper_panel:
            pts = paper("ablation_points.csv").filter(pl.col("panel") == paper_panel)
            pts = pts.filter(pl.col("method").is_in(["ttt_e2e", "full_attention"]))
            if not pts.is_empty():
                ax2 = ax.twinx()
                for m, g in pts.group_by("method"):
                    name = PAPER_METHOD[m[0]]
                    paper_markers(
                        ax2, g["value"], g["loss"], f"paper 760M: {name} (right axis)", name
                    )
                ax2.set_ylabel("paper loss, 760M DCLM 8K")
                ax2.legend(fontsize=7, loc="lower right")
                vals += pts["value"].to_list()
        if log2:
            context_axis(ax, vals)
        ax.set(xlabel=xlabel, ylabel="eval loss (nats/token)")
        ax.legend(fontsize=7, loc="center right")
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


def _token_index(t):
    paired = "delta" in t.columns and t["delta"].is_not_null().any()
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key, g in t.group_by("method", maintain_order=True):
        g = g.filter(pl.col("position") > 0).sort("position")
        color = COLORS.get(key[0])
        ax.plot(g["position"], g["mean"], color=color, lw=0.5, alpha=0.3)
        ax.plot(g["position"], g["binned"], label=key[0], color=color, lw=1.5)
    ax.set_xscale("log")
    ax.set(
        xlabel="token index (log scale)",
        ylabel="NLL (nats/token)",
        title="Loss by token index (faint: per position; bold: log-binned)",
    )
    ax.legend(fontsize=7)
    if paired:  # one point per bin, at the bin's first position
        d = (
            t.filter(pl.col("delta").is_not_null() & (pl.col("position") > 0))
            .group_by("method", "bin", maintain_order=True)
            .agg(pl.col("position").min(), pl.col("delta", "delta_lo", "delta_hi", "runs").first())
        )
        b = axes[0][1]
        lines(b, d, "position", "delta", "delta_lo", "delta_hi")
        b.axhline(0, color="black", lw=0.8)
        b.set_xscale("log")
        b.set(xlabel="token index (log scale)", ylabel="NLL - full attention's (nats)",
              title="Difference to full attention (paired by seed, 95% CI)")  # fmt: skip
        b.legend(fontsize=7)
    return fig


def _ladder(t):
    """Table 1 as two panels of rungs: this store's loss minus SWA's (paired by seed, with
    its 95% bootstrap interval) and the paper's 760M numbers minus its SWA's."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    names = t["method"].to_list()
    x = list(range(len(names)))
    colors = [COLORS.get(n, "gray") for n in names]
    paired = t.with_columns(pl.col("delta").fill_null(0.0), pl.col("delta_lo").fill_null(0.0),
                            pl.col("delta_hi").fill_null(0.0))  # fmt: skip
    err = [paired["delta"] - paired["delta_lo"], paired["delta_hi"] - paired["delta"]]
    a.errorbar(x, paired["delta"], yerr=err, fmt="none", ecolor="black", capsize=4)
    a.scatter(x, paired["delta"], c=colors, s=60, zorder=3)
    within_noise(a, paired.with_columns(pl.Series("rung_x", x)).filter(pl.col("method") != "swa"),
                 "rung_x")  # fmt: skip
    a.set(ylabel="loss minus SWA's (nats)", title=f"This store ({int(t['runs'].min())}+ seeds "
          "per rung; paired, 95% CI)")  # fmt: skip
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


def _one_axis(x: str, xlabel: str, ylabel: str, title: str, log: bool = True):
    """One panel: a line per method against `x` (log scale), seed bands."""

    def f(t):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines(ax, t, x)
        if log:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
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


@dataclass(frozen=True)
class Figure:
    """One paper figure: the recipe that builds its tidy table from tracked runs, the
    drawing of that table, and the sweep spec (or command) whose runs it needs."""

    name: str
    recipe: Callable[[Data], pl.DataFrame | None]
    draw: Callable[[pl.DataFrame], Any]
    hint: str


# The registry: adding a figure is one entry here.
FIGURES: dict[str, Figure] = {
    f.name: f
    for f in [
        Figure(
            "fig1_context_length",
            recipes.context_length,
            _context_length,
            "sweeps/context_scaling.yaml (or sweeps/small_scale.yaml on a CPU)",
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
        ),
        Figure(
            "fig4_chunk",
            recipes.chunk,
            _ablation("ttt.chunk", "chunk length b (tokens)", True, "chunk"),
            "sweeps/chunk_ablation.yaml",
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
            _token_index,
            "sweeps/quickstart.yaml (any sweep with full and ttt_e2e)",
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
        ),
        Figure(
            "compute",
            recipes.compute,
            _one_axis(
                "flops",
                "training FLOPs (the project's count)",
                "training loss (nats/token)",
                "Loss at equal compute",
            ),
            "any sweep with two methods (sweeps/small_scale.yaml, sweeps/ladder_small.yaml)",
        ),
        Figure(
            "curves",
            recipes.curves,
            _curves,
            "any sweep",
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
        out.mkdir(parents=True, exist_ok=True)
        fig = draw(name, table)
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


def nll_artifacts(parquet: Path, out: Path, method: str) -> list[Path]:
    """One run's per-position NLL as the MLflow UI can show it: Fig 6's drawing as a PNG,
    and its log-binned table (four bins per octave) as CSV, which the UI previews."""
    nll = pl.read_parquet(parquet).select("position", "nll").with_columns(method=pl.lit(method))
    table = recipes.nll_by_token_index(nll)
    out.mkdir(parents=True, exist_ok=True)
    fig = _token_index(table)
    fig.axes[0].set_title(f"{method}: NLL by token index (bold: log-binned)")
    fig.tight_layout()
    png = out / f"{parquet.stem}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    binned = (
        table.group_by("bin", maintain_order=True)
        .agg(
            pl.col("position").min().alias("first_position"),
            pl.col("position").max().alias("last_position"),
            pl.col("mean").mean().alias("nll_nats_per_token"),
        )
        .sort("bin")
        .drop("bin")
    )
    csv = out / f"{parquet.stem}_binned.csv"
    binned.write_csv(csv, float_precision=5)
    return [png, csv]


WITH_UPDATES, INITIAL_ALONE = "with test-time updates", "initial weights alone"


def inner_split(with_inner: Path, without: Path, png: Path, title: str) -> Path:
    """`ttt eval --no-inner`'s figure: NLL by token index with the test-time updates and
    with the meta-learned initial weights alone (left), and what the updates buy at each
    position (right: alone minus with; above 0, the updates help). Both log-binned."""
    nll = pl.concat(
        pl.read_parquet(path).select("position", "nll").with_columns(method=pl.lit(name))
        for path, name in ((with_inner, WITH_UPDATES), (without, INITIAL_ALONE))
    )
    table = recipes.nll_by_token_index(nll).filter(pl.col("position") > 0)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for (name,), g in table.group_by("method", maintain_order=True):
        a.plot(g["position"], g["mean"], lw=0.5, alpha=0.3)
        a.plot(g["position"], g["binned"], lw=1.5, label=name, color=a.lines[-1].get_color())
    a.set(xscale="log", xlabel="token index (log scale)", ylabel="NLL (nats/token)")
    a.set_title(title, fontsize=9)
    a.legend(fontsize=7)
    gain = (
        table.pivot(on="method", index=["position", "bin"], values="mean")
        .with_columns((pl.col(INITIAL_ALONE) - pl.col(WITH_UPDATES)).alias("gain"))
        .with_columns(pl.col("gain").mean().over("bin").alias("binned"))
        .sort("position")
    )
    b.plot(gain["position"], gain["gain"], lw=0.5, alpha=0.3, color="tab:green")
    b.plot(gain["position"], gain["binned"], lw=1.5, color="tab:green")
    b.axhline(0, color="black", lw=0.8)
    b.set(
        xscale="log",
        xlabel="token index (log scale)",
        ylabel="NLL without updates - with (nats)",
        title="What the test-time updates buy",
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def inner_loop_by_chunk(table: pl.DataFrame, png: Path, title: str) -> Path:
    """`ttt eval --telemetry`'s figure: by chunk, what each inner step bought on the chunk
    it learned from and on the next one (loss before minus after: above 0, the step
    helped), and per TTT layer the gradient norm (before and after clipping) and the
    update's size relative to the weights."""
    losses = table.group_by("chunk").agg(pl.all().exclude("layer").first()).sort("chunk")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    a.plot(losses["chunk"], losses["loss_before"] - losses["loss_after"], marker=".",
           label="on its own chunk")  # fmt: skip
    a.plot(losses["chunk"], losses["next_before"] - losses["next_after"], marker=".",
           label="on the next chunk")  # fmt: skip
    a.axhline(0, color="black", lw=0.8)
    a.set(xlabel="chunk", ylabel="loss before - after the step (nats)", title=title)
    a.legend(fontsize=7)
    for (layer,), g in table.group_by("layer", maintain_order=True):
        g = g.sort("chunk")
        line = b.plot(g["chunk"], g["grad_norm"], label=f"layer {layer}")[0]
        b.plot(g["chunk"], g["clipped_grad_norm"], ls="--", color=line.get_color())
        c.plot(g["chunk"], g["update_rel"], label=f"layer {layer}")
    b.set(xlabel="chunk", ylabel="inner gradient norm", title="Gradient (dashed: clipped)")
    c.set(xlabel="chunk", ylabel="||dW|| / ||W||", title="Update size", yscale="log")
    for ax in (b, c):
        ax.legend(fontsize=7)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def niah_heatmap(frame: pl.DataFrame, png: Path, title: str) -> Path:
    """RULER's picture of a NIAH evaluation: accuracy by needle depth (rows) and context
    length (columns), one panel per task, every sample of each cell averaged."""
    tasks = sorted(frame["task"].unique())
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.4 * len(tasks) + 1, 3.8), squeeze=False, layout="constrained"
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        cells = (
            frame.filter(pl.col("task") == task)
            .group_by("depth", "seq_len")
            .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("n"))
        )
        depths = sorted(cells["depth"].unique())
        lengths = sorted(cells["seq_len"].unique())
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for r in cells.iter_rows(named=True):
            grid[depths.index(r["depth"])][lengths.index(r["seq_len"])] = r["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for r in cells.iter_rows(named=True):
            i, j = depths.index(r["depth"]), lengths.index(r["seq_len"])
            ax.text(j, i, f"{r['accuracy']:.2f}\nn={r['n']}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [fmt_tokens(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=task)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(title, fontsize=9)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def eval_figure_files(parquet: Path, out: Path, params: dict) -> list[Path]:
    """What a tracked run's evaluation shows in the MLflow UI (`ttt.tracking`'s renderer):
    `nll_artifacts`, labelled with the method the figures use for the run's params."""
    run = pl.DataFrame(
        {
            "model.mixer": [params.get("model.mixer")],
            "ttt.meta": [params.get("ttt.meta") != "False"],
        }
    )
    method = recipes.with_method(run)["method"][0] or "run"
    return nll_artifacts(parquet, out, method)
