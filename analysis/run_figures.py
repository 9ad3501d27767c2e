"""The figures of one run's evaluation (what `ttt eval` draws beside its tables, and what
a tracked run shows in the MLflow UI): NLL by token index, the split of the test-time
updates, the inner loop by chunk, needle-in-a-haystack and recall accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl

from analysis import recipes
from analysis.figures import draw_token_index
from analysis.style import fmt_tokens, mark_window_chunk, recall_lines
from ttt.evaluation.weights import run_config
from ttt.rundir import RunDir, companion


def nll_artifacts(parquet: Path, out: Path, method: str, name: str = "") -> list[Path]:
    """One run's per-position NLL as the MLflow UI can show it: Fig 6's drawing as a PNG
    (titled with the run's name and method, the evaluation's 95% band where its bins were
    recorded), and its log-binned table (four bins per octave) as CSV, which the UI
    previews."""
    nll = pl.read_parquet(parquet).select("position", "nll").with_columns(method=pl.lit(method))
    table = recipes.nll_by_token_index(nll)
    bins = companion(parquet, "bins")
    if bins.is_file():
        se = pl.read_parquet(bins).select("bin", pl.col("se").alias("binned_se"))
        table = table.join(se, on="bin", how="left")
    out.mkdir(parents=True, exist_ok=True)
    fig = draw_token_index(table)
    who = f"{name} ({method})" if name else method
    fig.axes[0].set_title(f"{who}: NLL by token index\n(bold: log-binned; position 0 not drawn "
                          "on log x)", fontsize=9)  # fmt: skip
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
    a.set(xscale="log", xlabel="token index (log scale; position 0 not drawn)",
          ylabel="NLL (nats/token)")  # fmt: skip
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
        xlabel="token index (log scale; position 0 not drawn)",
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


def eval_figure_files(parquet: Path, out: Path, params: dict, name: str = "") -> list[Path]:
    """What a tracked run's evaluation shows in the MLflow UI (`ttt.tracking`'s renderer):
    `nll_artifacts`, titled with the run's name and the method the figures use for its
    params."""
    run = pl.DataFrame(
        {
            "model.mixer": [params.get("model.mixer")],
            "ttt.meta": [params.get("ttt.meta") != "False"],
        }
    )
    method = recipes.with_method(run)["method"][0] or "run"
    return nll_artifacts(parquet, out, method, name)


def recall_run_figure(table: pl.DataFrame, png: Path, title: str, cfg) -> Path:
    """One run's recall accuracy by distance (`ttt eval --task recall`), its standard
    error over the held-out sequences as a band, the window and the chunk marked."""
    t = table.with_columns(
        (pl.col("accuracy") - 1.96 * pl.col("accuracy_se")).clip(0, 1).alias("accuracy_lo"),
        (pl.col("accuracy") + 1.96 * pl.col("accuracy_se")).clip(0, 1).alias("accuracy_hi"),
        pl.lit(title).alias("run"),
    )
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    recall_lines(ax, t, "run", cfg.recall.chance)
    window = None if cfg.model.mixer == "full" else cfg.model.window
    mark_window_chunk(ax, window, cfg.ttt.chunk if cfg.model.mixer == "ttt_e2e" else None)
    ax.set_title(f"{title}\n(band: 95% interval over the held-out sequences)", fontsize=8)
    ax.legend(fontsize=7)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def render_measurement(m, run_dir: Path) -> list[Path]:
    """`ttt eval`'s render sink (`ttt.evaluation.Sinks.render`): the figures of one
    measurement, written beside its tables."""
    if m.kind == "telemetry":
        png = m.tables[0].with_suffix(".png")
        return [inner_loop_by_chunk(m.table, png, f"{run_dir}: inner loop by chunk")]
    if m.kind == "niah":
        everything = pl.read_parquet(m.tables[0])  # this call's cells and every earlier one's
        png = m.tables[0].with_suffix(".png")
        return [niah_heatmap(everything, png, f"{run_dir}: NIAH accuracy")]
    out = []
    if m.kind == "loss" and m.without_inner is not None:  # what the updates bought
        png = RunDir(run_dir).inner_split_figure(m.seq_len)
        out.append(inner_split(m.tables[0], m.without_inner, png, f"{run_dir}: T={m.seq_len}"))
    if m.kind in ("loss", "recall") and m.table is not None:  # the recall task's distances
        over = {"data.seq_len": m.seq_len}
        if m.kind == "recall":
            over["data.source"] = "recall"
        cfg = run_config(run_dir, over)
        png = m.tables[0].with_name(f"{m.tables[0].stem}_recall.png")
        out.append(recall_run_figure(m.table, png, f"{Path(run_dir).name}: T={m.seq_len}", cfg))
    return out
