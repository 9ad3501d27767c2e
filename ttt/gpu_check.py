"""`python -m ttt.gpu_check OUT [--first N] [--budget S]`: every GPU check in one process.

First correctness on the device (the equivalences the CPU tests prove, here with the GPU
kernels: cuDNN attention, bf16, blocked logits), then the benchmark rows of BENCHMARKS.md
in priority order. Each row is written to OUT/rows.json as soon as it is measured, so a
run cut short keeps what it measured; a row that fails (e.g. out of memory) is recorded
with its error. No new row starts once `--budget` seconds have passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt.bench import bench_decode, bench_one, format_table
from ttt.config import load_config
from ttt.model import create_model
from ttt.model.check import chunked_and_whole, model_nll
from ttt.model.layers import Attention, attend_sequence
from ttt.model.loop import hidden_nll, token_nll

# (mode, preset, mixer, seq_len, batch, extra overrides), most wanted first.
ROWS = [
    ("train", "125m", "full", 8192, 8, ()),
    ("train", "125m", "ttt_e2e", 8192, 8, ()),
    ("train", "125m", "ttt_e2e", 8192, 8, ("model.remat=inner",)),
    ("train", "125m", "ttt_e2e", 8192, 8, ("ttt.cache_phases=2",)),
    ("train", "125m", "swa", 8192, 8, ()),
    ("prefill", "125m", "full", 131072, 1, ()),
    ("prefill", "125m", "ttt_e2e", 131072, 1, ()),
    ("prefill", "125m", "ttt_e2e", 131072, 1, ("ttt.chunk_attention=cudnn",)),
    ("train", "760m", "full", 8192, 4, ()),
    ("train", "760m", "ttt_e2e", 8192, 4, ("model.remat=inner",)),
    ("prefill", "125m", "swa", 131072, 1, ()),
    ("prefill", "125m", "full", 32768, 1, ()),
    ("prefill", "125m", "ttt_e2e", 32768, 1, ()),
    ("prefill", "125m", "ttt_e2e", 32768, 1, ("ttt.chunk_attention=cudnn",)),
    ("train", "125m", "full", 32768, 2, ()),
    ("train", "125m", "ttt_e2e", 32768, 2, ("model.remat=inner",)),
    ("train", "125m", "ttt_e2e", 8192, 8, ("model.remat=block",)),
    ("train", "760m", "ttt_e2e", 8192, 4, ()),
    ("train", "125m", "full", 8192, 8, ("model.attention=dense",)),
    ("train", "125m", "ttt_e2e", 8192, 8, ("ttt.cache_phases=3",)),
    ("prefill", "125m", "ttt_e2e", 32768, 1, ("ttt.cache_phases=2",)),
    # Fig 1's other baselines: train at 8K, prefill at 32K and 128K
    ("train", "125m", "hybrid", 8192, 8, ()),
    ("train", "125m", "gated_deltanet", 8192, 8, ()),
    ("train", "125m", "mamba2", 8192, 8, ()),
    ("prefill", "125m", "hybrid", 32768, 1, ()),
    ("prefill", "125m", "gated_deltanet", 32768, 1, ()),
    ("prefill", "125m", "mamba2", 32768, 1, ()),
    ("prefill", "125m", "gated_deltanet", 131072, 1, ()),
    ("prefill", "125m", "mamba2", 131072, 1, ()),
    # Table 1's lower rungs
    ("train", "125m", "ttt_kvb", 8192, 8, ()),
    ("train", "125m", "ttt_e2e", 8192, 8, ("model.ttt_layers=12", "model.fast_heads=12")),
    ("prefill", "125m", "ttt_kvb", 32768, 1, ()),
    # decode: mean latency per generated token after a prompt of T (batch 1)
    ("decode", "125m", "full", 32768, 1, ()),
    ("decode", "125m", "swa", 32768, 1, ()),
    ("decode", "125m", "ttt_e2e", 32768, 1, ()),
    ("decode", "125m", "full", 8192, 1, ()),
    ("decode", "125m", "ttt_e2e", 8192, 1, ()),
    ("decode", "125m", "gated_deltanet", 32768, 1, ()),
    ("decode", "125m", "mamba2", 32768, 1, ()),
    ("decode", "125m", "ttt_kvb", 32768, 1, ()),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _nll(cfg, params=None, **kw):
    """(per-token NLL, params): the tests' `model_nll` on the same batch."""
    _, nll, params = model_nll(cfg, params, **kw)
    return np.asarray(nll), params


def correctness() -> list[tuple[str, float, float]]:
    """(check, relative error, tolerance) for each equivalence, run on the default device."""
    out = []
    nano = lambda *o, mixer="ttt_e2e", dt="float32": load_config(  # noqa: E731
        "nano",
        [
            "data.seq_len=256",
            "model.window=96",
            f"model.mixer={mixer}",
            f"model.compute_dtype={dt}",
            *o,
        ],
    )
    with jax.default_matmul_precision("highest"):
        # Chunked SWA with a carried window equals whole-sequence SWA (fp32, dense).
        cfg = nano()
        attn = Attention(cfg.model, jnp.float32, nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (256, cfg.model.width))
        chunked, whole = chunked_and_whole(attn, x, 96, 32)
        out.append(("chunked swa == whole swa (fp32)", _rel(chunked, whole), 1e-5))

        # ttt_e2e with inner LR 0 equals the same weights without inner updates (fp32).
        plain, params = _nll(cfg, inner=False)
        zero, _ = _nll(cfg, params, inner=True, inner_lr=0.0)
        out.append(("ttt_e2e eta=0 == no inner updates (fp32)", _rel(zero, plain), 1e-5))

        # The chunk loop as 3 scans with growing caches equals one scan (fp32).
        one, _ = _nll(cfg, params, inner=True)
        three, _ = _nll(nano("ttt.cache_phases=3"), params, inner=True)
        out.append(("ttt_e2e cache_phases=3 == 1 (fp32)", _rel(three, one), 1e-5))

        # Blocked, recomputed logits equal whole logits (fp32).
        model = create_model(cfg.model)
        h = jax.random.normal(jax.random.key(2), (2, 256, cfg.model.width))
        t = jax.random.randint(jax.random.key(3), (2, 256), 0, 258)
        blocked = hidden_nll(model, h, t, block=258 * 64)
        out.append(
            (
                "blocked logits nll == whole (fp32)",
                _rel(blocked, token_nll(model.logits(h), t)),
                1e-6,
            )
        )

    # cuDNN flash attention against the dense masked softmax, bf16, values and gradients
    # (off the GPU the same comparison runs against jax's XLA path, as a smoke test).
    fast = "cudnn" if jax.default_backend() == "gpu" else "xla"
    q, k, v = jax.random.normal(jax.random.key(4), (3, 2, 2048, 12, 64), jnp.bfloat16)
    r = jax.random.normal(jax.random.key(5), q.shape, jnp.bfloat16)
    for window in (None, 512):

        def f(q, k, v, kernel, window=window):
            o = attend_sequence(q, k, v, window, kernel)
            return jnp.sum(o.astype(jnp.float32) * r), o

        (_, od), gd = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True), static_argnums=3)(
            q, k, v, "dense"
        )
        (_, oc), gc = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True), static_argnums=3)(
            q, k, v, fast
        )
        out.append((f"{fast} == dense attention, window={window} (bf16)", _rel(oc, od), 2e-2))
        out.append(
            (
                f"{fast} == dense attention grads, window={window} (bf16)",
                max(_rel(a, b) for a, b in zip(gc, gd, strict=True)),
                3e-2,
            )
        )

    # In bf16 on the GPU the plain path takes cuDNN and the inner loop the dense form;
    # with eta=0 they must still agree, and full must equal swa when the window covers T.
    cfg = nano(dt="bfloat16")
    plain, params = _nll(cfg, inner=False)
    zero, _ = _nll(cfg, params, inner=True, inner_lr=0.0)
    out.append(("ttt_e2e eta=0 (dense inner) == plain (cudnn), bf16", _rel(zero, plain), 2e-2))
    full, p = _nll(nano("model.window=256", mixer="full", dt="bfloat16"), inner=False)
    swa, _ = _nll(nano("model.window=256", mixer="swa", dt="bfloat16"), p, inner=False)
    out.append(("full == swa with window >= T (cudnn, bf16)", _rel(swa, full), 1e-2))

    # Evaluation/prefill: the chunks attend through the fused kernel with an explicit
    # mask (ttt.chunk_attention), inner updates on, caches that grow (empty slots).
    nll = {}
    for kernel in ("dense", fast):
        c = nano("ttt.cache_phases=2", f"ttt.chunk_attention={kernel}", dt="bfloat16")
        nll[kernel], _ = _nll(c, params, inner=True, first_order=True)
    out.append(
        (f"ttt_e2e chunk attention {fast} == dense, bf16", _rel(nll[fast], nll["dense"]), 3e-2)
    )
    return out


def cache_check(out_dir: Path) -> str:
    """The LR-only warm/cold compile, in a fresh process: JAX binds its cache once."""
    cmd = [sys.executable, "-m", "ttt.cli", "bench", "cache", "125m", "--mixers", "full,ttt_e2e"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    (out_dir / "cache.txt").write_text(r.stdout + r.stderr)
    return r.stdout.strip() or r.stderr.strip()[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--first", type=int, default=0, help="index of the first row to run")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; no row starts after")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--cache", action="store_true", help="also run the LR-only cache check")
    ap.add_argument("--smoke", action="store_true", help="pico rows at T=128 (CPU smoke test)")
    a = ap.parse_args()
    smoke = [("train", "pico", m, 128, 2, ()) for m in ("full", "gated_deltanet", "ttt_e2e")]
    smoke.append(("prefill", "pico", "ttt_e2e", 128, 2, ("ttt.chunk_attention=xla",)))
    smoke.append(("decode", "pico", "ttt_e2e", 128, 1, ()))
    rows_todo = smoke if a.smoke else ROWS
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}, backend {jax.default_backend()}")
    lines = []
    if not a.skip_correctness:
        for name, err, tol in correctness():
            lines.append(
                f"{'ok  ' if err <= tol else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:g})"
            )
            print(lines[-1], flush=True)
        (a.out / "correctness.txt").write_text("\n".join(lines) + "\n")
    rows, records = [], []
    for i, (mode, preset, mixer, t, b, extra) in enumerate(rows_todo[a.first :], start=a.first):
        if time.perf_counter() - t0 > a.budget:
            print(f"budget spent: rows {i}.. not run", flush=True)
            break
        cfg = load_config(
            preset, [f"model.mixer={mixer}", f"data.seq_len={t}", f"data.batch_size={b}", *extra]
        )
        label = f"[{i}] {mode} {preset} {mixer} T={t} B={b} {' '.join(extra)}"
        try:
            if mode == "decode":
                row = bench_decode(cfg, tokens=2 * cfg.ttt.chunk)
            else:
                row = bench_one(cfg, mode, steps=5, warmup=1)
            rows.append(row)
            records.append({"index": i, "extra": list(extra), **row.as_dict()})
            print(
                f"{label}: {row.step_s:.4f} s/step, compile {row.compile_s:.1f} s, "
                f"mem {row.peak_mem_gb or 0:.1f} GB",
                flush=True,
            )
        except Exception as e:  # an OOM or a kernel refusal is a result too
            msg = "".join(traceback.format_exception_only(e)).strip().splitlines()[0][:300]
            records.append(
                {
                    "index": i,
                    "mode": mode,
                    "preset": preset,
                    "mixer": mixer,
                    "seq_len": t,
                    "batch": b,
                    "extra": list(extra),
                    "error": msg,
                }
            )
            print(f"{label}: FAILED {msg}", flush=True)
        (a.out / "rows.json").write_text(json.dumps(records, indent=1))
    if rows:
        table = format_table(rows)
        (a.out / "table.txt").write_text(table + "\n")
        print(table)
    if a.cache and time.perf_counter() - t0 < a.budget:
        print(cache_check(a.out))
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
