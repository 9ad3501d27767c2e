"""Every shipped sweep spec, run for real in miniature (pico, one step, the same axes and
stages with shrunk values) through Ray Tune and MLflow, then drawn by `ttt plots`: the
figure the spec exists for must come out of its own runs, with the same lines and points
as the synthetic store of the same spec (which the analysis tests and notebooks use)."""

import os
from pathlib import Path

import polars as pl
import pytest
import yaml
from test_analysis import SPEC_FIGURES, figure_points

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPECS = Path(__file__).parent.parent / "sweeps"
# Shrunk values for the keys whose paper values a pico model cannot take (at most two
# of them; other swept keys keep all their values).
SHRUNK = {
    "model.window": [16, 32],
    "ttt.chunk": [8, 16],
    "model.ttt_layers": [1, 2],
    "preset": ["pico", "nano"],
}
# Set here for every trial, whatever the spec says: the miniature's shapes and budget.
BASE = {
    "data.seq_len": 64,
    "data.batch_size": 2,
    "train.grad_accum": 1,
    "train.eval_batches": 1,
    "model.window": 32,
    "ttt.chunk": 16,
}
# `released_eval` evaluates imported checkpoints (tests/test_sweeps.py runs a `task: eval`
# sweep over the reference checkpoint through Ray); the small-scale spec has its own
# miniature there too.
# `prose_small`, `longer_small` and `equal_flops_small` are `small_scale` on another corpus,
# for longer or at equal FLOPs; their
# figure (loss against FLOPs at every logged step) the synthetic store draws at other
# steps than a miniature logs.
LOGGED_STEPS = {"prose_small", "longer_small", "equal_flops_small"}
REAL = sorted(set(SPEC_FIGURES) - {"released_eval", "small_scale"} - LOGGED_STEPS)
# All of them take about 20 minutes on two cores (about 15 s of compiling per trial), more
# than the suite can spend: by default it runs one staged spec and one size sweep, the
# shapes whose figures once came out empty (the small-scale miniature is the other staged
# one), and Table 1's ladder, whose rungs are settings beyond the mixer.
DEFAULT = {"ttt_layers_ablation", "model_size", "table1_ladder"}
ALL = os.environ.get("TTT_TEST_ALL_SPECS") == "1"
CASES = [
    pytest.param(
        stem,
        marks=pytest.mark.skipif(
            stem not in DEFAULT and not ALL,
            reason="TTT_TEST_ALL_SPECS=1 runs this spec's miniature (about 20 min for all)",
        ),
    )
    for stem in REAL
]


def _grid(key: str, value):
    if isinstance(value, dict) and "grid" in value:
        values = value["grid"]
        return {"grid": SHRUNK[key][: len(values)] if key in SHRUNK else values}
    return SHRUNK.get(key, [value])[0] if key in SHRUNK else value


def miniature(stem: str, corpus: Path) -> dict:
    raw = yaml.safe_load((SPECS / f"{stem}.yaml").read_text())
    pins = dict(BASE)
    if "preset" in raw.get("search", {}):
        # A size sweep as a user writes one: what the presets set (window, chunk) comes
        # from each preset, so the figure has to let it move with the size.
        pins = {k: v for k, v in pins.items() if k not in ("model.window", "ttt.chunk")}
    base = {k: v for k, v in raw["base"].get("overrides", {}).items() if k not in BASE}
    base.update(pins, **{"data.source": str(corpus)})
    raw["base"] = {"config": "pico", "overrides": [f"{k}={v}" for k, v in base.items()]}
    if "search" in raw:
        raw["search"] = {k: _grid(k, v) for k, v in raw["search"].items()}
    if "variants" in raw:
        raw["variants"] = [{k: _grid(k, v) for k, v in var.items()} for var in raw["variants"]]
        for var in raw["variants"]:  # Table 1's multi-head rung keeps "all layers"
            if "model.fast_heads" in var:
                var.update({"model.ttt_layers": 4, "model.fast_heads": 4})
    for i, stage in enumerate(raw.get("stages", [])):
        over = stage.get("overrides", {})
        over = {k: v for k, v in over.items() if k not in ("data.source", "train.grad_accum")}
        if "data.seq_len" in over:
            over.update({"data.seq_len": 128 * 2**i, "data.batch_size": 1})
        stage.update(steps=1, overrides=over)
    if raw.get("scheduler", {}).get("type") == "asha":
        raw["scheduler"].update(grace_period=1, max_t=1)
    raw.update(stop={"steps": 1}, report_every=1, checkpoint_every=0, max_failures=0)
    raw.update(resources={"cpu": 0.5}, max_concurrent=4, name=f"mini-{stem}")
    return raw


def points(out: Path, stem: str) -> dict:
    figure, x, _ = SPEC_FIGURES[stem]
    return figure_points(pl.read_parquet(out / f"{figure}.parquet"), figure, x)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["TTT_TUNE_VERBOSE"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("stem", CASES)
def test_each_shipped_spec_in_miniature_draws_its_figure(stem, tmp_path, corpus, ray_cluster):
    from analysis.figures import build_all
    from analysis.synthetic import spec_like
    from sweeps.driver import run_sweep
    from sweeps.spec import load_spec

    figure = SPEC_FIGURES[stem][0]
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(miniature(stem, corpus)))
    spec = load_spec(path, [])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    for stage in result.stages:
        assert {r["outcome"] for r in stage.rows} <= {"finished", "early_stopped"}, stage.rows
    from sweeps.status import sweep_status

    # every planned trial is matched to its run, also where variants set different keys
    assert "not started" not in sweep_status(spec.name, uri)
    written, missing = build_all(uri, tmp_path / "real", [spec.name], formats=("png",))
    assert figure in written, missing.get(figure)
    # what the synthetic store of the same spec draws (every trial finished)
    synthetic = f"sqlite:///{tmp_path / 'synthetic.db'}"
    spec_like(synthetic, spec)
    build_all(synthetic, tmp_path / "synthetic", [spec.name], formats=("png",), only=[figure])
    real = points(tmp_path / "real", stem)
    if stem == "inner_lr":  # ASHA may stop trials early: a subset of the points
        synth = points(tmp_path / "synthetic", stem)
        assert real and all(real[k] <= synth[k] for k in real), (real, synth)
    else:
        assert real == points(tmp_path / "synthetic", stem)
    # every context length of a staged spec, every size of a size sweep
    if spec.stages:
        lengths = {64, *(128 * 2**i for i in range(len(spec.stages)))}
        assert all(xs == lengths for xs in real.values()), real
    if figure == "fig5_model_size":
        assert all(xs == {"pico", "nano"} for xs in real.values()), real
