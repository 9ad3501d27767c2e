"""Loaders, figure recipes and `ttt plots` against stores written with the real MLflow client."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import data_overrides

from analysis import build_all, metric_history, runs, token_nll
from analysis.synthetic import FakeRun, trial_params, write_store
from ttt.cli import main


def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_loaders_match_what_was_logged(tmp_path):
    nll = np.linspace(3.0, 2.0, 64)
    logged = [
        FakeRun(
            "exp",
            trial_params("ttt_e2e", model__window=32),
            final={"final_eval_loss": 3.25},
            history={"loss": [(1, 5.0), (2, 4.5), (3, 4.0)], "lr": [(1, 1e-3), (3, 2e-3)]},
            nll=nll,
        ),
        FakeRun(
            "exp",
            trial_params("full"),
            final={"final_eval_loss": 3.5},
            history={"loss": [(1, 5.5), (3, 4.4)]},
            outcome="diverged",
        ),
    ]
    ids = write_store(uri(tmp_path), logged)
    frame = runs(uri(tmp_path))
    assert frame.height == 2 and set(frame["run_id"]) == set(ids)
    row = frame.filter(pl.col("run_id") == ids[0]).row(0, named=True)
    assert row["model.mixer"] == "ttt_e2e" and row["model.window"] == 32
    assert row["ttt.meta"] is True and row["final_eval_loss"] == 3.25
    assert row["outcome"] == "finished" and row["status"] == "FINISHED" and row["sweep"] == "exp"
    other = frame.filter(pl.col("run_id") == ids[1]).row(0, named=True)
    assert other["outcome"] == "diverged" and other["status"] == "FAILED"

    hist = metric_history(uri(tmp_path), ids, ["loss", "lr"])
    got = hist.filter(pl.col("run_id") == ids[0], pl.col("key") == "loss")
    assert got["step"].to_list() == [1, 2, 3] and got["value"].to_list() == [5.0, 4.5, 4.0]
    assert hist.filter(pl.col("key") == "lr")["value"].to_list() == [1e-3, 2e-3]
    every = metric_history(uri(tmp_path), ids)
    assert set(every["key"]) == {"loss", "lr", "final_eval_loss"}

    nll_frame = token_nll(uri(tmp_path), ids)
    assert nll_frame["run_id"].unique().to_list() == [ids[0]]  # the other has no artifact
    np.testing.assert_allclose(nll_frame["nll"].to_numpy(), nll)
    assert nll_frame["position"].to_list() == list(range(64))


def _ablation_store(tmp_path):
    """Two seeds per setting, known losses: base[method] + 0.01 * window / 32 + seed / 100."""
    base = {"full": 3.0, "swa": 3.2, "ttt_e2e": 2.9}
    fake = []
    for seed in (0, 1):
        for window in (32, 64):
            for mixer in ("swa", "ttt_e2e"):
                loss = base[mixer] + 0.01 * window / 32 + seed / 100
                fake.append(
                    FakeRun(
                        "abl",
                        trial_params(mixer, model__window=window, train__seed=seed),
                        final={"final_eval_loss": loss},
                        nll=np.full(16, loss) + np.arange(16) / 100,
                    )
                )
        fake.append(
            FakeRun(
                "abl",
                trial_params("full", train__seed=seed),
                final={"final_eval_loss": base["full"] + seed / 100},
                nll=np.full(16, 3.0),
            )
        )
        for seq_len in (512, 1024):  # context-length runs
            for mixer, b in (("full", 3.0), ("ttt_e2e", 2.9)):
                fake.append(
                    FakeRun(
                        "ctx",
                        trial_params(mixer, data__seq_len=seq_len, train__seed=seed),
                        final={"final_eval_loss": b - seq_len / 10240 + seed / 100},
                    )
                )
    fake.append(
        FakeRun(
            "abl",
            trial_params("swa", model__window=128),
            final={"final_eval_loss": 9.0},
            outcome="diverged",
        )
    )
    write_store(uri(tmp_path), fake)


def test_recipes_write_the_expected_tidy_tables(tmp_path):
    _ablation_store(tmp_path)
    out = tmp_path / "figs"
    written, missing = build_all(uri(tmp_path), out, experiments=["abl"])
    assert {"fig4_window", "fig6_token_index"} <= set(written)
    assert "curves" in missing  # this store logged no histories
    assert "fig1_context_length" in missing
    for name, paths in written.items():
        assert all(p.exists() and p.stat().st_size > 0 for p in paths), name
    window = pl.read_parquet(out / "fig4_window.parquet")
    ttt = window.filter(pl.col("method") == "ttt_e2e").sort("model.window")
    # seed mean of 2.9 + 0.01 w/32 + {0, 0.01}; min/max are the two seeds
    np.testing.assert_allclose(ttt["mean"], [2.915, 2.925])
    np.testing.assert_allclose(ttt["min"], [2.91, 2.92])
    np.testing.assert_allclose(ttt["max"], [2.92, 2.93])
    assert ttt["runs"].to_list() == [2, 2]
    assert 128 not in window["model.window"].to_list()  # the diverged run is left out
    full = window.filter(pl.col("method") == "full")
    np.testing.assert_allclose(full["mean"], [3.005])  # reference line, no window

    tokens = pl.read_parquet(out / "fig6_token_index.parquet")
    # both windows qualify (the other methods' settings are shared): each is its own
    # labelled line, both seeds in each; nothing is picked silently
    lines = set(tokens.filter(pl.col("method") == "ttt_e2e")["line"])
    assert lines == {"ttt_e2e k=32", "ttt_e2e k=64"}
    assert set(tokens.filter(pl.col("method") == "swa")["line"]) == {"swa k=32", "swa k=64"}
    t = tokens.filter(pl.col("line") == "ttt_e2e k=32").sort("position")
    assert t["position"].to_list() == list(range(16))
    assert t["runs"].to_list() == [2] * 16
    np.testing.assert_allclose(
        t["mean"] - np.arange(16) / 100, np.full(16, t["mean"][0]), atol=1e-12
    )
    # each seed's run minus its full-attention twin (flat 3.0): at position 0 (its own
    # bin) the seed mean's difference, and an interval spanning the two seeds (0.01 apart)
    row = t.row(0, named=True)
    center = row["mean"] - 3.0
    assert row["pairs"] == 2
    np.testing.assert_allclose([row["delta_lo"], row["delta"], row["delta_hi"]],
                               [center - 0.005, center, center + 0.005], atol=1e-12)  # fmt: skip

    written, _ = build_all(uri(tmp_path), out, experiments=["ctx"])
    ctx = pl.read_parquet(out / "fig1_context_length.parquet")
    d = ctx.filter(pl.col("method") == "ttt_e2e").sort("data.seq_len")
    np.testing.assert_allclose(d["delta"], [-0.1, -0.1], atol=1e-12)  # Δ to full attention
    np.testing.assert_allclose(d["mean"], [2.9 - 0.05 + 0.005, 2.9 - 0.1 + 0.005])


def test_plots_without_data_explains_and_writes_nothing(tmp_path, capsys):
    write_store(
        uri(tmp_path),
        [FakeRun("bad", trial_params("swa"), final={"final_eval_loss": 3}, outcome="error")],
    )
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as exc:
        main(["plots", "--tracking-uri", uri(tmp_path), "--out", str(out), "--experiment", "bad"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "fig4_window: no data yet; run sweeps/window_ablation.yaml" in text
    assert "no figure had data" in text
    assert not out.exists()
    # A misspelt experiment is an error that lists the ones there are.
    with pytest.raises(SystemExit) as exc:
        main(["plots", "--tracking-uri", uri(tmp_path), "-e", "nothing-here"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "'nothing-here': no such experiment" in err[-1] and "bad" in err[-1]
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["plots", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    assert exc.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["analysis", "ablations"])
def test_notebooks_execute(tmp_path, name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from analysis.synthetic import quickstart_like

    quickstart_like(uri(tmp_path))
    monkeypatch.setenv("TTT_TRACKING_URI", uri(tmp_path))
    monkeypatch.setenv("TTT_FIGURES", str(tmp_path / "figs"))
    path = Path(__file__).parent.parent / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    if name == "analysis":
        assert "16 trials" in text and "160 loss points" in text
        for fig in ("fig4_window", "fig4_chunk", "fig6_token_index", "inner_lr_meta", "curves"):
            assert f"drawn: {fig}" in text
        assert "missing: fig5_model_size" in text
        assert (tmp_path / "figs" / "fig4_window.png").exists()
    else:
        # the fixture's losses fall with the setting index; meta off (the last) is lowest:
        # 3.4 - 0.03 * 7 + mean of the seed offsets {0, 0.01}
        assert "best: ttt_e2e (meta off) at inner_lr=1.0, loss 3.1950" in text
        images = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if "image/png" in o.get("data", {})
        ]
        assert len(images) >= 3


@pytest.mark.slow
def test_bench_rows_feed_the_latency_figure(tmp_path, capsys):
    for seq_len in (32, 64):
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "bench",
                    "prefill",
                    "pico",
                    f"data.seq_len={seq_len}",
                    "ttt.chunk=16",
                    "data.batch_size=2",
                    "--steps",
                    "1",
                    "--warmup",
                    "0",
                    "--tracking-uri",
                    uri(tmp_path),
                ]
            )
        assert exc.value.code == 0
    assert "logged 3 rows" in capsys.readouterr().out
    written, missing = build_all(
        uri(tmp_path), tmp_path / "figs", only=["fig1_prefill_latency", "fig8_train_latency"]
    )
    assert "fig8_train_latency" in missing
    table = pl.read_parquet(written["fig1_prefill_latency"][-1])
    assert sorted(table["method"].unique()) == ["full", "swa", "ttt_e2e"]
    assert sorted(table["seq_len"].unique()) == [32, 64]
    bench = runs(uri(tmp_path), role="bench")
    row = bench.filter((pl.col("mixer") == "swa") & (pl.col("seq_len") == 64)).row(0, named=True)
    got = table.filter((pl.col("method") == "swa") & (pl.col("seq_len") == 64))["mean"][0]
    assert got == pytest.approx(row["step_s"] / (64 * 2 / 1024))  # seconds per 1K tokens
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "pico", "--mixers", "mamba"])
    assert exc.value.code == 2 and "mamba" in capsys.readouterr().err


SPECS = Path(__file__).parent.parent / "sweeps"
K = 1024
# Each shipped spec, the figure it exists for, and the points (x value per line) that its
# runs must draw. The stores are the runs each spec logs (`spec_like`: every grid point,
# seed and stage, with the params and stage tags the sweep callback writes).
# Fig 1's baselines, which the context specs train beside TTT-E2E
FIG1 = ("full", "swa", "hybrid", "gated_deltanet", "mamba2")
# Table 1's rungs: each drawn once, at the paper's name for it
LADDER = {
    "swa": {"swa_k8k"},
    "ttt_kvb": {"ttt_kvb"},
    "ttt_kvb (simplified output)": {"ttt_kvb_simplified_output"},
    "ttt_e2e (all layers, multi-head)": {"ttt_e2e_all_layers_multihead"},
    "ttt_e2e": {"ttt_e2e"},
}
SPEC_FIGURES = {
    "context_scaling": (
        "fig1_context_length",
        "data.seq_len",
        {m: {8 * K, 16 * K, 32 * K, 64 * K, 128 * K} for m in (*FIG1, "ttt_e2e")},
    ),
    "small_scale": (
        "fig1_context_length",
        "data.seq_len",
        {m: {256, K} for m in (*FIG1, "ttt_e2e", "ttt_e2e (meta off)")},
    ),
    "table1_ladder": ("table1_ladder", "variant", LADDER),
    "longer_small": ("compute", "step", {m: set(range(80, 801, 80)) for m in ("full", "ttt_e2e")}),
    "equal_flops_small": (
        "compute",
        "step",
        {"full": set(range(35, 351, 35)), "ttt_e2e": set(range(20, 201, 20))},
    ),
    "size_small": ("fig5_model_size", "preset", {"ttt_e2e": {"pico", "nano", "micro"}}),
    "prose_small": (
        "compute",
        "step",
        {m: set(range(20, 201, 20)) for m in ("full", "ttt_e2e", "ttt_e2e (meta off)")},
    ),
    "ladder_small": ("table1_ladder", "variant", LADDER),
    "ttt_layers_ablation": (
        "fig4_ttt_layers",
        "data.seq_len",
        {("ttt_e2e", n): {8 * K, 32 * K} for n in (1, 3, 6, 12)},
    ),
    "model_size": (
        "fig5_model_size",
        "preset",
        {"ttt_e2e": {"125m", "350m", "760m", "1b", "3b"}},
    ),
    "meta": (
        "fig5_model_size",
        "preset",
        {m: {"125m", "760m"} for m in ("swa", "ttt_e2e", "ttt_e2e (meta off)")},
    ),
    "window_ablation": (
        "fig4_window",
        "model.window",
        {m: {K, 2 * K, 4 * K, 8 * K} for m in ("swa", "ttt_e2e")} | {"full": {None}},
    ),
    "chunk_ablation": (
        "fig4_chunk",
        "ttt.chunk",
        {"ttt_e2e": {K, 2 * K, 4 * K, 8 * K}, "full": {None}, "swa": {None}},
    ),
    # the spec's two inner-LR warm-up starts: a line each, both named
    "inner_lr": (
        "inner_lr_meta",
        "ttt.inner_lr",
        {f"ttt_e2e eta0={e}": {0.1, 0.3, 1.0, 3.0, 10.0} for e in (0.01, 0.1)},
    ),
    "released_eval": (
        "eval_context_length",
        "data.seq_len",
        {
            f"ttt-e2e-{s}-books": {8 * K, 16 * K, 32 * K, 64 * K, 128 * K}
            for s in ("125m", "1b", "3b")
        },
    ),
    "recall_small": (
        "recall_by_distance",
        "distance_lo",
        {m: {4, 8, 16} for m in ("full", "swa", "gated_deltanet", "mamba2", "ttt_kvb")}
        | {f"{m} b={b}": {4, 8, 16} for m in ("ttt_e2e", "ttt_e2e (meta off)") for b in (4, 8)},
    ),
    "quickstart": (
        "fig4_window",
        "model.window",
        {
            "swa": {32, 64},
            "ttt_e2e": {32, 64},
            "ttt_e2e b=64": {64},
            "ttt_e2e eta=0.1": {64},
            "full": {None},
        },  # fmt: skip
    ),
}


def figure_points(table: pl.DataFrame, figure: str, x: str) -> dict:
    """A figure's drawn points: {line: {x values}}, a line being the method (or the
    method and TTT-layer count, or the evaluated model)."""
    line = {"fig4_ttt_layers": ["line", "model.ttt_layers"], "eval_context_length": ["model"]}
    line = line.get(figure, ["line" if "line" in table.columns else "method"])
    got: dict = {}
    for row in table.iter_rows(named=True):
        key = tuple(row[k] for k in line) if len(line) > 1 else row[line[0]]
        got.setdefault(key, set()).add(row[x])
    return got


def test_every_shipped_spec_has_a_figure_test():
    assert {p.stem for p in SPECS.glob("*.yaml")} == set(SPEC_FIGURES)


@pytest.mark.parametrize("stem", sorted(SPEC_FIGURES))
def test_each_spec_draws_its_figure_from_its_own_runs(stem, tmp_path, capsys):
    from analysis.synthetic import spec_like

    figure, x, expected = SPEC_FIGURES[stem]
    from sweeps.spec import load_spec

    path = SPECS / f"{stem}.yaml"
    spec = load_spec(path, data_overrides(path, tmp_path))
    spec_like(uri(tmp_path), spec, seeds=(0, 1))
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as exc:
        main(["plots", "--tracking-uri", uri(tmp_path), "-e", spec.name, "--out", str(out)])
    assert exc.value.code == 0
    assert f"{figure}: {out / figure}.png" in capsys.readouterr().out
    table = pl.read_parquet(out / f"{figure}.parquet")
    assert figure_points(table, figure, x) == expected
    assert table["runs"].min() == 2  # both seeds in every point: min/max bands


def test_a_staged_sweep_draws_fig1_from_both_stages(tmp_path):
    """The stage runs differ from the pre-training runs in length, batch, steps, data and
    start point: all of that moves with the context length, none of it splits a line."""
    from analysis.recipes import Data, context_length

    base = dict(data__seq_len=256, data__batch_size=4, train__steps=300)
    ext = dict(data__seq_len=1024, data__batch_size=2, train__steps=100)
    fake = []
    for i, mixer in enumerate(("full", "swa", "ttt_e2e")):
        fake.append(FakeRun("st", trial_params(mixer, **base), final={"final_eval_loss": 3 + i}))
        fake.append(
            FakeRun(
                "st",
                trial_params(mixer, train__init_from=f"ckpt{i}", **ext),
                final={"final_eval_loss": 2.5 + i},
                stage="ext1k",
            )
        )
    write_store(uri(tmp_path), fake)
    table = context_length(Data(uri(tmp_path), ["st"]))
    assert table is not None
    points = {(r["method"], r["data.seq_len"]): r["mean"] for r in table.iter_rows(named=True)}
    assert points == {
        ("full", 256): 3.0,
        ("full", 1024): 2.5,
        ("swa", 256): 4.0,
        ("swa", 1024): 3.5,
        ("ttt_e2e", 256): 5.0,
        ("ttt_e2e", 1024): 4.5,
    }


def test_a_size_sweep_over_the_cpu_presets_draws_fig5_with_every_size(tmp_path):
    """Nothing pinned: each preset brings its own chunk, window, steps and the rest, and
    all of that moves with the size instead of cutting the line to one preset."""
    import yaml

    from analysis.recipes import Data, model_size
    from analysis.synthetic import spec_like
    from sweeps.spec import load_spec

    path = tmp_path / "size-demo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "size-demo",
                "base": {"config": "pico", "overrides": {"data.seq_len": 64}},
                "stop": {"steps": 3},
                "search": {
                    "preset": {"grid": ["pico", "nano"]},
                    "model.mixer": {"grid": ["full", "ttt_e2e"]},
                },
            }
        )
    )
    spec_like(uri(tmp_path), load_spec(path, []))
    table = model_size(Data(uri(tmp_path), ["size-demo"]))
    assert table is not None
    assert figure_points(table, "fig5_model_size", "preset") == {"ttt_e2e": {"pico", "nano"}}
