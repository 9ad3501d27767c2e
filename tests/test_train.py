"""Training: overfitting, data parallelism, exact resume, extension, divergence, eval."""

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import PICO_TRAIN, random_batch
from flax import nnx

from ttt.cli import main
from ttt.model import create_model
from ttt.train import run
from ttt.train.optim import hyper
from ttt.train.step import init_opt_state, make_train_step

# Whole training runs: the full tier (`make test`), not `make test-fast`.
pytestmark = pytest.mark.slow


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.parametrize("mixer", ["full", "swa", "ttt_e2e"])
def test_overfits_one_repeated_batch(train_cfg, mixer):
    cfg = train_cfg(f"model.mixer={mixer}", "train.steps=60", "train.lr=1e-2", "train.warmup=0.05")
    graphdef, params = nnx.split(create_model(cfg.model))
    opt_state = init_opt_state(cfg, params)
    step = make_train_step(cfg, graphdef)
    batch = random_batch(jax.random.key(0), 4, cfg.data.seq_len, vocab=64)
    first = None
    for i in range(cfg.train.steps):
        params, opt_state, m = step(params, opt_state, batch, hyper(cfg, i))
        first = first if first is not None else float(m["loss"])
    # Random tokens over 64 symbols: ln 64 = 4.16 nats is chance; memorising goes far below.
    assert first > 5.0 and float(m["loss"]) < 1.0, (first, float(m["loss"]))


def test_resume_continues_exactly(train_cfg, tmp_path):
    cfg = train_cfg("train.steps=8", "train.checkpoint_every=3")
    whole = run(cfg, tmp_path / "whole", progress=False)
    part = run(cfg, tmp_path / "part", stop_at=5, progress=False)
    assert part.status == "stopped" and part.step == 5
    first = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    resumed = run(cfg, tmp_path / "part", progress=False)
    assert resumed.status == "finished" and resumed.step == 8
    # Steps 1-5 were not run again: their lines, measured tokens/s included, are kept.
    assert (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()[: len(first)] == first
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 9))  # each step logged once
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=0, atol=1e-6)
    pos = [
        json.loads((d / "checkpoints" / "8" / "meta" / "metadata").read_text())["position"]
        for d in (tmp_path / "whole", tmp_path / "part")
    ]
    assert pos[0] == pos[1] == 8 * cfg.data.batch_size
    # keep_checkpoints=2: of steps 3, 6 and 8 only the last two stay
    assert sorted(
        p.name for p in (tmp_path / "whole" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["6", "8"]
    assert resumed.eval_loss == pytest.approx(whole.eval_loss, abs=1e-6)
    # a finished run run again does nothing and reports the same
    again = run(cfg, tmp_path / "part", progress=False)
    assert again.status == "finished" and again.eval_loss == pytest.approx(whole.eval_loss)


def test_a_run_dir_refuses_another_config(train_cfg, tmp_path, capsys):
    run(train_cfg("train.steps=2"), tmp_path / "r", progress=False)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "pico",
                f"data.source={train_cfg().data.source}",
                "--out",
                str(tmp_path / "r"),
                "-q",
            ]
        )
    assert exc.value.code == 2 and "another config" in capsys.readouterr().err


def test_extension_with_init_from(train_cfg, tmp_path):
    base = run(train_cfg("train.steps=30"), tmp_path / "8k", progress=False)
    run(train_cfg("data.seq_len=128", "train.steps=2"), tmp_path / "fresh", progress=False)
    ext = run(
        train_cfg("data.seq_len=128", "train.steps=2", f"train.init_from={tmp_path / '8k'}"),
        tmp_path / "32k",
        progress=False,
    )
    assert ext.status == "finished"
    first = losses(tmp_path / "32k")[1]
    # the loaded weights start where the short-context run ended, far below a fresh model
    assert first < losses(tmp_path / "fresh")[1] - 1.0
    assert abs(first - base.loss) < 0.5


def test_init_from_needs_a_run(train_cfg, tmp_path, capsys):
    from ttt.errors import UserError

    with pytest.raises(UserError, match="train.init_from"):
        run(train_cfg(f"train.init_from={tmp_path}"), tmp_path / "x", progress=False)
    # A failed start leaves nothing behind: the corrected command then just runs.
    assert not (tmp_path / "x").exists()
    args = ["train", "pico", *PICO_TRAIN, f"data.source={train_cfg().data.source}", "-q"]
    args += ["train.steps=1", "train.eval_batches=1", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        main([*args, f"train.init_from={tmp_path / 'nothing'}"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0 and "finished at step 1" in capsys.readouterr().out


def test_raising_steps_extends_a_finished_run(train_cfg, tmp_path, capsys):
    out = tmp_path / "r"
    assert run(train_cfg("train.steps=3"), out, progress=False).status == "finished"
    first = (out / "metrics.jsonl").read_text().splitlines()
    longer = run(train_cfg("train.steps=5"), out, progress=False)
    assert longer.status == "finished" and longer.step == 5
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    assert (out / "metrics.jsonl").read_text().splitlines()[:3] == first[:3]  # not re-run
    # fewer steps than were run is still another config
    args = ["train", "pico", *PICO_TRAIN, f"data.source={train_cfg().data.source}"]
    with pytest.raises(SystemExit) as exc:
        main(
            [*args, "train.steps=2", "train.log_every=1", "train.eval_batches=2", "--out", str(out)]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "train.steps may only grow" in err, err


def test_a_loss_past_max_loss_ends_the_run_as_diverged(train_cfg, tmp_path, capsys):
    from ttt.train.trainer import max_loss

    assert max_loss(train_cfg()) == pytest.approx(3 * np.log(train_cfg().model.vocab_size))
    result = run(train_cfg("train.steps=4", "train.max_loss=1.0"), tmp_path / "m", progress=False)
    assert result.status == "diverged" and result.step == 1
    assert "train.max_loss=1" in result.message
    info = json.loads((tmp_path / "m" / "run.json").read_text())
    assert info["status"] == "diverged" and info["message"].startswith("diverged at step 1 (loss")


def test_huge_inner_lr_diverges_cleanly(train_cfg, tmp_path, capsys):
    cfg = train_cfg()
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "pico",
                f"data.source={cfg.data.source}",
                "data.seq_len=64",
                "ttt.chunk=16",
                "ttt.inner_lr=1e30",
                "ttt.inner_lr_warmup=0",
                "train.steps=5",
                "-q",
                "--out",
                str(tmp_path / "d"),
            ]
        )
    assert exc.value.code == 0
    assert "diverged at step 1" in capsys.readouterr().out
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["status"] == "diverged" and info["step"] == 1


def test_eval_cli_writes_per_position_nll(train_cfg, tmp_path, capsys):
    import polars as pl

    run(train_cfg("train.steps=2"), tmp_path / "r", progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "r"), "--seq-len", "128", "--max-batches", "1"])
    assert exc.value.code == 0
    frame = pl.read_parquet(tmp_path / "r" / "eval" / "nll_by_position_T128.parquet")
    assert frame["position"].to_list() == list(range(128))
    assert frame["count"].max() == 4 and frame["nll"].is_not_nan().sum() > 100
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "r"), "--max-batches", "-1"])
    assert exc.value.code == 2 and "--max-batches=-1: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "r"), "--seq-len", "100"])
    assert exc.value.code == 2 and "multiple of ttt.chunk" in capsys.readouterr().err


def test_eval_without_the_test_time_updates(train_cfg, tmp_path, capsys):
    """`--no-inner` is the meta-learned initial weights alone: the same as the inner loop
    with a zero inner LR, equal to the updated model on the first chunk (which no update
    precedes) and not after it; a run with no updates is refused in one line."""
    import json

    import numpy as np
    import polars as pl

    from ttt.evaluation import Request, evaluate, load_weights, measure, run_config

    # train.telemetry: every evaluation also measures the inner steps
    tele = ("train.telemetry=true", "train.eval_every=1", "train.eval_batches=1")
    run(train_cfg("train.steps=2", *tele), tmp_path / "r", progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(np.isfinite(r["inner_gain_own"]) and r["inner_update_rel"] > 0 for r in evals)
    assert all(r["eval_loss_noinner"] != r["eval_loss"] for r in evals)
    off, _ = evaluate(tmp_path / "r", Request(max_batches=1, no_inner=True))
    assert off.kind == "noinner"
    assert off.summary["loss"] == pytest.approx(evals[-1]["eval_loss_noinner"], abs=1e-6)
    uri = f"sqlite:///{tmp_path / 'evals.db'}"
    args = ["eval", str(tmp_path / "r"), "--seq-len", "128", "--max-batches", "1", "--no-inner"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--telemetry", "--tracking-uri", uri])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "nats bought" in out and "nats on their own chunk" in out
    from analysis.loaders import runs as tracked

    logged = tracked(uri, role="telemetry")
    assert logged.height == 1 and logged["inner_gain_own"][0] > 0
    folder = tmp_path / "r" / "eval"
    telemetry = pl.read_parquet(folder / "inner_loop_T128.parquet")  # and its figure
    assert len(telemetry) == 128 // 16 and (folder / "inner_loop_T128.png").exists()
    on, off = (
        pl.read_parquet(folder / f"nll_by_position_T128{s}.parquet") for s in ("", "_noinner")
    )
    assert (folder / "inner_split_T128.png").exists()
    chunk = run_config(tmp_path / "r").ttt.chunk
    np.testing.assert_allclose(off["nll"][:chunk], on["nll"][:chunk], atol=1e-6)
    assert np.abs((off["nll"] - on["nll"]).to_numpy()[chunk:]).max() > 1e-4

    cfg = run_config(tmp_path / "r", {"data.seq_len": 128}).replace(**{"ttt.inner_lr": 0.0})
    loaded = load_weights(cfg, tmp_path / "r")
    measure.loss(loaded.under(cfg), tmp_path / "z.parquet", 1)
    np.testing.assert_allclose(
        pl.read_parquet(tmp_path / "z.parquet")["nll"], off["nll"], atol=1e-5
    )

    run(train_cfg("train.steps=1", "model.mixer=full"), tmp_path / "f", progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "f"), "--no-inner"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "only ttt_e2e has test-time updates" in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "f"), "--telemetry"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "only ttt_e2e has an inner loop" in err
    assert not list((tmp_path / "f" / "eval").glob("*_T*.parquet"))  # refused before any work


DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from ttt.config import load_config
    from ttt.train import run
    assert len(jax.devices()) == 2
    cfg = load_config("pico", sys.argv[2:])
    out = []
    for n in (1, 2):
        r = run(cfg, f"{sys.argv[1]}/dev{n}", devices=jax.devices()[:n], progress=False)
        lines = open(f"{sys.argv[1]}/dev{n}/metrics.jsonl").read().splitlines()
        out.append([json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)])
    print(json.dumps(out))
""")


def test_two_devices_match_one(train_cfg, tmp_path):
    cfg = train_cfg()
    env = {
        **os.environ,
        # the session's flags (conftest) plus two host devices
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    args = [
        f"data.source={cfg.data.source}",
        *PICO_TRAIN,
        "train.steps=5",
        "train.log_every=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", DP_SCRIPT, str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(one) == len(two) == 5
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


def test_schedules():
    from ttt.config import load_config
    from ttt.train.optim import inner_lr, outer_lr

    cfg = load_config(
        "pico",
        [
            "train.steps=100",
            "train.lr=1e-3",
            "train.min_lr=1e-5",
            "train.warmup=0.1",
            "ttt.inner_lr=1.0",
            "ttt.inner_lr_init=0.1",
            "ttt.inner_lr_warmup=0.2",
        ],
    )
    lr = [float(outer_lr(hyper(cfg, s))) for s in range(100)]
    eta = [float(inner_lr(hyper(cfg, s))) for s in range(100)]
    np.testing.assert_allclose(lr[0], 1e-4, rtol=1e-5)  # warm-up: (step + 1) / 10 of peak
    np.testing.assert_allclose(lr[9], 1e-3, rtol=1e-5)
    np.testing.assert_allclose(lr[10], 1e-3, rtol=1e-5)  # cosine starts at the peak
    np.testing.assert_allclose(lr[55], 1e-5 + 0.5 * (1e-3 - 1e-5), rtol=1e-4)  # half-way
    assert lr[99] < 1.1e-5 and all(a >= b for a, b in zip(lr[10:], lr[11:], strict=False))
    np.testing.assert_allclose(eta[0], 0.1, rtol=1e-6)
    np.testing.assert_allclose(eta[10], 0.1 + 0.5 * 0.9, rtol=1e-6)
    np.testing.assert_allclose(eta[20:], 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "variant", ["train.grad_accum=2", "model.remat=block", "model.remat=inner"]
)
def test_grad_accum_and_remat_leave_the_step_unchanged(train_cfg, variant):
    np.testing.assert_allclose(
        three_steps(train_cfg(variant)), three_steps(train_cfg()), rtol=2e-5, atol=2e-5
    )


@functools.cache  # configs are frozen: the plain trajectory is computed once per session
def three_steps(cfg) -> list[float]:
    """The losses of three train steps from the seed-0 init on one random batch."""
    graphdef, params = nnx.split(create_model(cfg.model))
    step = make_train_step(cfg, graphdef)
    opt_state = init_opt_state(cfg, params)
    batch = random_batch(jax.random.key(1), 4, cfg.data.seq_len)
    out = []
    for i in range(3):
        params, opt_state, m = step(params, opt_state, batch, hyper(cfg, i))
        out.append(float(m["loss"]))
    return out


def test_two_processes_match_one(train_cfg, tmp_path):
    """One run made of 2 JAX processes (joined with jax.distributed, CPU collectives)
    follows the same loss trajectory as one process with the same global batch. Each
    process has its own run dir, as on nodes without a shared filesystem: process 0 alone
    keeps checkpoints, and on resume the other process gets the state from it.

    The mixer is `full`: what is under test is the processes' plumbing, and the five
    processes would each build the second-order ttt_e2e step, tripling the test's time.
    The sharded inner loop is checked by `test_two_devices_match_one`."""
    import shutil

    cfg = train_cfg()
    args = [
        "pico",
        f"data.source={cfg.data.source}",
        *PICO_TRAIN,
        "model.mixer=full",
        "train.steps=5",
        "train.log_every=1",
        "train.eval_batches=1",
        "train.checkpoint_every=3",
        "-q",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # one device a process (conftest's flags)
    cmd = [sys.executable, "-m", "ttt.cli", "train", *args]

    def two_processes():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [
            subprocess.Popen(
                [
                    *cmd,
                    "--out",
                    str(tmp_path / f"multi{i}"),
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]

    two_processes()
    single = subprocess.run(
        [*cmd, "--out", str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "multi0")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "multi0" / "run.json").read_text())
    assert info["devices"] == 2 and info["status"] == "finished"
    assert not (tmp_path / "multi1" / "checkpoints").exists()  # only process 0 saved

    # Resume from step 3 as if killed after it: process 0 restores, process 1 receives.
    log = tmp_path / "multi0" / "metrics.jsonl"
    first = [ln for ln in log.read_text().splitlines() if json.loads(ln).get("step", 0) <= 3]
    shutil.rmtree(tmp_path / "multi0" / "checkpoints" / "5")
    shutil.rmtree(tmp_path / "multi1")
    two_processes()
    # Steps 1-3 were not run again: their lines, measured tokens/s included, are the
    # first run's own.
    assert log.read_text().splitlines()[: len(first)] == first
    b = losses(tmp_path / "multi0")
    assert sorted(b) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=0, atol=1e-5)


def test_hooks_run_every_n_steps_and_can_end_the_run(train_cfg, tmp_path):
    from ttt.train import Diverged, Trainer

    trainer = Trainer(train_cfg("train.steps=5"), tmp_path / "h", progress=False)
    seen = []
    trainer.add_hook(lambda step: seen.append(step.number), every=2)
    stepped = [step.number for step in trainer.steps()]
    result = trainer.finish()
    assert stepped == [1, 2, 3, 4, 5] and seen == [2, 4] and result.status == "finished"
    assert sorted(losses(tmp_path / "h")) == [1, 2, 3, 4, 5]

    def stop(step):
        raise Diverged(f"diverged at step {step.number} (a caller's own rule)")

    trainer = Trainer(train_cfg("train.steps=5"), tmp_path / "d", progress=False)
    trainer.add_hook(stop, every=3)
    result = trainer.run()
    assert result.status == "diverged" and result.step == 3
    # hooks run in the order added: the built-in guard before the log, a caller's after it
    assert sorted(losses(tmp_path / "d")) == [1, 2, 3]
    info = json.loads((tmp_path / "d" / "run.json").read_text())
    assert info["message"] == "diverged at step 3 (a caller's own rule)"
