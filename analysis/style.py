"""What every figure shares: the methods' colours and markers, the paper's published
tables, context axes, lines with seed bands, and reference lines (the paper's numbers,
the corpus's floors, the window and the chunk)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from analysis import recipes
from ttt.data.floors import NAMES

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


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def lines(
    ax,
    table: pl.DataFrame,
    x: str,
    y: str = "mean",
    lo: str = "min",
    hi: str = "max",
    group: str | None = None,
    label_fmt=str,
) -> None:
    """A line per `group` (default: each `line` of the table, else each method), coloured
    by method; lines of one method differ in style, and every line has its own marker,
    so two that coincide (equal FLOPs, equal losses) both stay visible. The band between
    `lo` and `hi` is drawn only where more than one run stands behind a point."""
    group = group or ("line" if "line" in table.columns else "method")
    per_method: dict = {}
    groups = table.filter(pl.col(x).is_not_null()).group_by(group, maintain_order=True)
    for i, (key, g) in enumerate(groups):
        name = key[0]
        g = g.sort(x)
        method = g["method"][0] if "method" in g.columns else name
        color = COLORS.get(method) if isinstance(method, str) else None
        k = per_method[method] = per_method.get(method, -1) + 1
        ax.plot(g[x], g[y], marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[k % len(LINESTYLES)],
                label=label_fmt(name), color=color, alpha=0.9)  # fmt: skip
        if lo in g.columns and "runs" in g.columns and g["runs"].max() > 1:
            ax.fill_between(g[x], g[lo], g[hi], alpha=0.2, color=ax.lines[-1].get_color())


def interval_note(table: pl.DataFrame, what: str = "paired by seed") -> str:
    """What a difference panel's bands are, said only where they exist: one seed has no
    interval to draw."""
    pairs = table["pairs"].max() if "pairs" in table.columns and table.height else None
    if not pairs or pairs < 2:
        return "one seed: no interval"
    return f"{what}, {int(pairs)} seeds; 95% interval over seeds and evaluation"


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
            label=f"{row.get('line') or row['method']} (reference)",
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


def recall_lines(ax, table: pl.DataFrame, group: str, chance: float | None = None) -> None:
    """Accuracy against distance (log2 x), a line per `group` value with its standard
    error as a band where one exists, and the chance level."""
    for key, g in table.group_by(group, maintain_order=True):
        g = g.sort("distance_lo")
        name = key[0]
        color = COLORS.get(name) if isinstance(name, str) else None
        ax.plot(g["distance_lo"], g["accuracy"], marker="o", label=str(name), color=color)
        if "accuracy_lo" in g.columns and g["accuracy_lo"].is_not_null().any():
            ax.fill_between(g["distance_lo"], g["accuracy_lo"], g["accuracy_hi"], alpha=0.2,
                            color=ax.lines[-1].get_color())  # fmt: skip
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.3f})")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(table["distance_lo"].to_list()))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="distance from the pair to its query (tokens, log2 buckets)",
           ylabel="exact-match accuracy", ylim=(-0.03, 1.03))  # fmt: skip


def mark_window_chunk(ax, window: int | None, chunk: int | None) -> None:
    """Vertical lines where the attention window and one and several TTT chunks end."""
    if window:
        ax.axvline(window, color="black", ls="--", lw=1, label=f"window {window}")
    if chunk:
        ax.axvline(chunk, color="tab:green", ls=":", lw=1, label=f"chunk {chunk}")


FLOOR_STYLE = {1: ":", 2: "-.", 3: "--", 4: (0, (1, 3)), 5: (0, (5, 5))}


def floor_lines(ax, floors: dict, orders=(1, 2, 3, 4, 5)) -> None:
    """The corpus's floors (`ttt.data.floors`: held-out loss of n-gram count models) as
    labelled horizontal lines, for each data.source whose floors the store records. A
    loss above the bigram line has not yet learned local statistics."""

    many = len(floors) > 1
    low, _ = ax.get_ylim()  # the data's own range: far floors are named, not drawn
    below = []
    for source, f in floors.items():
        drawn_below = False
        for order in orders:
            if order not in f.orders:
                continue
            name = NAMES[order] + (f" ({source})" if many else "")
            value = f.orders[order]
            if value < low and drawn_below:
                below.append(f"{name} {value:.2f}")
                continue
            drawn_below |= value < low
            ax.axhline(value, color="0.55", lw=0.8, ls=FLOOR_STYLE.get(order, ":"),
                       label=f"{name} floor {value:.2f}", zorder=0)  # fmt: skip
    if below:
        ax.plot([], [], " ", label="below the axis: " + ", ".join(below))
