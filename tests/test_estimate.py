"""The pre-run estimate (`ttt.estimate`, `sweeps.cost`): its memory held to XLA's own
memory analysis of the compiled train step, its time to the measurements it is built
from, and `ttt sweep run --dry-run`'s cost section as a user meets it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweeps.cost import sweep_rows, usable_memory
from sweeps.spec import load_spec
from ttt.bench import train_step_bytes
from ttt.config import load_config
from ttt.estimate import ACCELERATORS, micro_batch, train_memory
from ttt.estimate.speed import REFERENCE, rate

SWEEPS = Path(__file__).parent.parent / "sweeps"
# The estimate against XLA's figure (`ttt.bench.compiled_bytes`: arguments + outputs -
# aliased + temporaries) on this machine's CPU, in fp32: within this fraction either way.
# BENCHMARKS.md ("Memory estimate against XLA") has the measured agreement.
TOLERANCE = 0.20
CASES = [  # full and ttt_e2e at each size, remat none and block; inner once (slow to compile)
    ("pico", "full", "none"),
    ("pico", "full", "block"),
    ("pico", "ttt_e2e", "inner"),
    ("nano", "full", "none"),
    ("nano", "full", "block"),
    ("nano", "ttt_e2e", "none"),
    ("micro", "full", "none"),
    ("micro", "ttt_e2e", "block"),
    # the paper's smallest size at its length, one sequence (compiled, never run)
    ("125m", "full", "none"),
    ("125m", "ttt_e2e", "none"),
]


@pytest.mark.slow
@pytest.mark.parametrize("preset,mixer,remat", CASES, ids=["-".join(c) for c in CASES])
def test_memory_estimate_is_within_tolerance_of_xla(preset, mixer, remat):
    over = {"data.batch_size": 1} if preset == "125m" else {}
    cfg = load_config(preset, {"model.mixer": mixer, "model.remat": remat, **over})
    xla = train_step_bytes(cfg)
    estimate = train_memory(cfg, backend="cpu").total
    assert abs(estimate / xla - 1) <= TOLERANCE, f"estimate {estimate:,.0f} vs XLA {xla:,.0f}"


def test_memory_follows_the_micro_batch_and_the_accumulator():
    """Activations scale with the sequences per replica per micro-step; accumulating
    gradients adds one gradient buffer; more replicas split the batch."""
    cfg = load_config("nano", {"model.mixer": "ttt_e2e"})
    whole, half = train_memory(cfg), train_memory(cfg.replace(**{"train.grad_accum": 2}))
    assert micro_batch(cfg) == 8 and micro_batch(cfg, devices=4) == 2
    assert half.gradients == 2 * whole.gradients and half.weights == whole.weights
    assert half.inner == pytest.approx(whole.inner / 2)
    assert train_memory(cfg, devices=2).inner == pytest.approx(half.inner)
    inner = train_memory(cfg.replace(**{"model.remat": "inner"}))
    assert inner.inner < whole.inner / 4  # only the carry stays per chunk


def test_a_reference_row_is_priced_at_its_own_throughput():
    """The MFU drawn from a reference row gives back that row's tokens/s on an H200."""
    for row in REFERENCE:
        cfg = row.config()
        r = rate(cfg, training=row.mode == "train")
        tokens = row.tokens_per_s * 3600
        hours = r.seconds(cfg, tokens, ACCELERATORS["h200"], 1, row.mode == "train") / 3600
        assert r.source == f"reference {row.label()}" and hours == pytest.approx(1.0)


def test_other_mixers_and_sizes_name_the_row_they_are_priced_from():
    swa = rate(load_config("3b", {"model.mixer": "swa"}))
    naive = rate(load_config("125m", {"model.mixer": "ttt_e2e", "ttt.meta": False}))
    e2e = rate(load_config("125m", {"model.mixer": "ttt_e2e", "data.seq_len": 32768}))
    assert swa.source == "reference 760m full train T=8K B=4"
    assert naive.source == "reference 125m full train T=8K B=8"  # no inner loop in training
    assert e2e.source == "reference 125m ttt_e2e train T=32K B=2"


def _spec(tmp_path, **fields):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", **fields}))
    return path


def test_a_from_best_stage_is_one_trial(tmp_path):
    path = _spec(
        tmp_path,
        base="pico",
        search={"model.mixer": {"grid": ["full", "ttt_e2e"]}},
        num_samples=2,
        stages=[{"name": "long", "from": "best", "steps": 5, "overrides": {"data.seq_len": 256}}],
    )
    rows = sweep_rows(load_spec(path))
    assert [(r.trial, r.stage, r.runs) for r in rows] == [
        ("0", "main", 2),
        ("1", "main", 2),
        ("best", "long", 1),
    ]
    assert rows[-1].cfg.model.mixer == "ttt_e2e"  # the costlier one stands for the best
    assert rows[-1].tokens == 5 * 4 * 256


def _dry_run(capsys, *argv):
    from ttt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sweep", "run", *map(str, argv)])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("spec", ["context_scaling", "table1_ladder"])
def test_paper_specs_are_priced_without_their_data(spec, capsys):
    """The paper-scale specs name /data/... datasets that are not on this machine."""
    path = SWEEPS / f"{spec}.yaml"
    code, out, err = _dry_run(capsys, path, "--dry-run")
    assert code == 0, err
    assert "data.source='/data/dclm': no such dataset directory" in err
    datasets = {d for d in ("/data/dclm", "/data/books") if d in path.read_text()}
    assert err.count("warning:") == len(datasets)  # one line per missing dataset
    assert "FLOPs" in out and "GiB" in out and "H200 h" in out
    assert "sweep total: " in out and "H200-hours" in out
    # ... while the sweep itself refuses to start without them, in one line
    code, out, err = _dry_run(capsys, path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "/data/dclm" in err, err


def test_several_accelerators_and_a_trial_that_does_not_fit(tmp_path, capsys):
    path = _spec(
        tmp_path,
        base={"config": "125m", "overrides": {"model.mixer": "full", "data.batch_size": 64}},
        stop={"steps": 10},
        resources={"gpu": 1},
    )
    code, out, err = _dry_run(capsys, path, "--dry-run", "--on", "a100,h100")
    assert code == 0, err
    assert "A100 h" in out and "H100 h" in out and "H200 h" not in out
    assert "A100-hours, " in out and "H100-hours (" in out
    warning = next(line for line in out.splitlines() if line.startswith("warning: trial 0"))
    assert "does not fit an A100" in warning and "train.grad_accum=" in warning
    accum = int(warning.split("train.grad_accum=")[1].split()[0])
    cfg = load_config("125m", {"model.mixer": "full", "data.batch_size": 64})
    fits = train_memory(cfg.replace(**{"train.grad_accum": accum})).total
    assert fits <= usable_memory(load_spec(path), "a100")  # the advice holds by the estimate


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dry-run", "--on", "tpu"], "'tpu' is not an accelerator it knows"),
        (["--dry-run", "--on", "h200,v100"], "'v100' is not an accelerator"),
        (["--dry-run", "--on", ","], "names no accelerator"),
        (["--dry-run", "--on"], "--on"),
        (["--dry-run", "--onn", "h100"], "--onn"),
        (["--on", "h100"], "--on prices a dry run"),
    ],
)
def test_mistakes_with_on_are_one_line_and_exit_2(args, needle, capsys):
    code, out, err = _dry_run(capsys, SWEEPS / "quickstart.yaml", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err and out == ""
