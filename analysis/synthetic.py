"""Synthetic tracking stores with known values, written through the real MLflow client:
for the tests, the notebooks' fixtures and `ttt bench analysis`."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from analysis.loaders import metric_history, runs
from analysis.recipes import with_method
from ttt import tags as TAG
from ttt.config import load_config
from ttt.tracking import MlflowRun


@dataclass
class FakeRun:
    experiment: str
    params: dict
    final: dict = field(default_factory=dict)  # metric -> value (logged at the last step)
    history: dict = field(default_factory=dict)  # metric -> list of (step, value)
    nll: np.ndarray | None = None  # per-position NLL -> eval/nll_by_position.parquet
    outcome: str = "finished"
    role: str = "trial"
    stage: str = "main"  # a sweep's later stages log into the same experiment


def write_store(tracking_uri: str, runs: list[FakeRun], parent_tags=None) -> list[str]:
    """Create experiments, a parent run each (with `parent_tags`: the floors a sweep
    records, say), and the child runs (through the project's one writer, `MlflowRun`);
    return child run ids."""

    parents: dict[str, str] = {}
    ids = []
    for run in runs:
        if run.experiment not in parents:
            key = {TAG.ROLE: "sweep", TAG.SWEEP: run.experiment, **(parent_tags or {})}
            parent = MlflowRun.open(tracking_uri, run.experiment, None, name=run.experiment,
                                    tags=key)  # fmt: skip
            parent.end("FINISHED")
            parents[run.experiment] = parent.run_id
        r = MlflowRun.open(
            tracking_uri,
            run.experiment,
            None,
            name=None,  # MLflow's generated name
            tags={TAG.ROLE: run.role, TAG.SWEEP: run.experiment, TAG.STAGE: run.stage},
            params=run.params,
            parent_id=parents[run.experiment],
        )
        r.log_history(run.history)
        last = max((s for pts in run.history.values() for s, _ in pts), default=0)
        r.log_summary(run.final, last)
        if run.nll is not None:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "nll_by_position.parquet"
                pl.DataFrame(
                    {
                        "position": np.arange(len(run.nll)),
                        "nll": run.nll,
                        "count": np.ones(len(run.nll), np.int64),
                    }
                ).write_parquet(path)
                r.log_artifact(path, "eval")
        r.finish(run.outcome)
        ids.append(r.run_id)
    return ids


def trial_params(mixer: str, **overrides) -> dict:
    """A full flat config for a nano trial, as a sweep would log it."""

    keys = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config("nano", [f"model.mixer={mixer}", *keys]).flat()


def quickstart_like(tracking_uri: str, experiment: str = "quickstart", seeds=(0, 1)) -> None:
    """A store shaped like the quickstart sweep, with smooth known losses: the notebooks'
    test fixture."""
    rng = np.random.default_rng(0)
    settings = [
        ("full", {}),
        ("swa", {"model__window": 32}),
        ("swa", {"model__window": 64}),
        ("ttt_e2e", {"model__window": 32}),
        ("ttt_e2e", {"model__window": 64}),
        ("ttt_e2e", {"ttt__chunk": 64}),
        ("ttt_e2e", {"ttt__inner_lr": 0.1}),
        ("ttt_e2e", {"ttt__meta": False}),
    ]
    fake = []
    for seed in seeds:
        for i, (mixer, over) in enumerate(settings):
            final = 3.4 - 0.03 * i + 0.01 * seed
            steps = range(5, 55, 5)
            fake.append(
                FakeRun(
                    experiment,
                    trial_params(mixer, train__seed=seed, **over),
                    final={"final_eval_loss": final, "eval_loss": final},
                    history={"loss": [(s, final + 2.5 * np.exp(-s / 15)) for s in steps]},
                    nll=final + 0.5 / np.sqrt(1 + np.arange(256)) + rng.normal(0, 0.01, 256),
                )
            )
    write_store(tracking_uri, fake)


# A smooth loss model with the paper's directions, for stores shaped like a spec's runs:
# lower with size and context, and at long context full < ttt_e2e < hybrid < ttt_e2e (meta
# off) < gated_deltanet < swa < mamba2, as the gaps of the paper's Fig 9 grow.
_METHOD_OFFSET = {
    "full": 0.0,
    "ttt_e2e": 0.01,
    "ttt_e2e (all layers, multi-head)": 0.011,
    "ttt_e2e (multi-head)": 0.012,
    "hybrid": 0.02,
    "ttt_kvb": 0.022,
    "ttt_kvb (simplified output)": 0.023,
    "ttt_e2e (meta off)": 0.04,
    "gated_deltanet": 0.05,
    "swa": 0.06,
    "mamba2": 0.07,
}


def model_loss(flat: dict, seed: int = 0) -> float:

    method = with_method(pl.DataFrame([flat]))["method"][0]
    context = np.log2(flat["data.seq_len"] / 1024)
    width = np.log2(flat["model.width"] * flat["model.layers"])
    gap = _METHOD_OFFSET[method] * (1 + 0.1 * context)
    return float(4.0 - 0.1 * width - 0.02 * context + gap + 0.005 * seed)


def recall_accuracy(flat: dict) -> dict[str, float]:
    """On the recall task: accuracy by distance bucket (`recall_accuracy_dN`), 1 inside
    attention's reach (all of it for full attention), falling to chance past it."""
    if flat.get("data.source") != "recall":
        return {}
    reach = flat["model.window"] * flat["model.layers"]
    chance = 1 / flat["recall.values"]
    out = {}
    for lo in (2**b for b in range(2, int(np.log2(flat["data.seq_len"])))):
        inside = flat["model.mixer"] == "full" or lo < reach
        out[f"recall_accuracy_d{lo}"] = 1.0 if inside else chance
    return out


def spec_like(tracking_uri: str, spec, seeds=(0,), loss=model_loss) -> list[str]:
    """A store holding exactly the runs `spec` (a loaded `SweepSpec`) would log: one per
    grid point, sample and seed in its first stage, then one per start in each later
    stage, each with the params the sweep's callback logs (the resolved config, with
    `train.init_from` for a stage) and the stage tag. The losses come from `loss`."""
    fake, first = [], []
    if any("train.seed" in p for p in spec.points):
        seeds = (None,)  # the spec sweeps its seeds itself
    for seed in seeds:
        for point in spec.points:
            sample = {} if seed is None else {"train.seed": seed}
            flat = spec.config(point, sample).flat()
            first.append((point, sample, loss(flat, flat["train.seed"])))
            role = "eval" if spec.task == "eval" else "trial"  # as the sweep's callback tags
            final = {"final_eval_loss": first[-1][2], **recall_accuracy(flat)}
            steps = np.linspace(0, flat["train.steps"], 11)[1:].astype(int)
            curve = [(int(s), first[-1][2] + 2.5 * np.exp(-5 * s / steps[-1])) for s in steps]
            history = {"loss": curve}
            fake.append(FakeRun(spec.name, flat, final=final, role=role, history=history))
    for stage in spec.stages:
        starts = first if stage.start_from == "each" else [min(first, key=lambda t: t[2])]
        for i, (point, sample, _) in enumerate(starts):
            over = {**sample, "train.init_from": f"checkpoint_{i:06d}"}
            flat = spec.config(point, over, stage).flat()
            value = loss(flat, flat["train.seed"])
            fake.append(
                FakeRun(spec.name, flat, final={"final_eval_loss": value}, stage=stage.name)
            )
    return write_store(tracking_uri, fake)


def bench_store(tracking_uri: str, n_runs: int, steps: int, keys: int) -> list[str]:
    """`n_runs` trial runs with `keys` metric histories of `steps` points each."""
    names = ["loss", "grad_norm", "lr", "inner_lr", "tokens_per_s", "mfu", "eval_loss"][:keys]
    names += [f"metric_{i}" for i in range(keys - len(names))]
    fake = [
        FakeRun(
            "bench-analysis",
            trial_params("ttt_e2e", train__seed=i),
            final={"final_eval_loss": 3.0 + i / n_runs},
            history={k: [(s, 1.0 + s / steps) for s in range(1, steps + 1)] for k in names},
        )
        for i in range(n_runs)
    ]
    return write_store(tracking_uri, fake)


def bench_analysis(workdir: Path, n_runs: int = 500, steps: int = 1000, keys: int = 5) -> dict:
    """Time the loaders on a synthetic store (the write is not timed)."""

    uri = f"sqlite:///{workdir / 'bench.db'}"
    t0 = time.perf_counter()
    bench_store(uri, n_runs, steps, keys)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    frame = runs(uri)
    runs_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hist = metric_history(uri, frame["run_id"].to_list())
    hist_s = time.perf_counter() - t0
    # The non-bulk way for comparison: one MLflow request per run and metric.
    from ttt.tracking import client

    c = client(uri)
    keys_ = hist["key"].unique().to_list()
    t0 = time.perf_counter()
    naive = sum(len(c.get_metric_history(r, k)) for r in frame["run_id"] for k in keys_)
    naive_s = time.perf_counter() - t0
    assert naive == hist.height
    return {
        "runs": frame.height,
        "points": hist.height,
        "write_s": write_s,
        "load_runs_s": runs_s,
        "load_history_s": hist_s,
        "per_request_history_s": naive_s,
        "speedup": naive_s / hist_s,
    }
