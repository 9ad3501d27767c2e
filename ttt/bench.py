"""`ttt bench train|prefill`: step time, tokens/s, MFU, compile time and peak memory for
several mixers side by side, in one process, on random tokens of the config's shapes."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ttt import compile_cache
from ttt.config import Config
from ttt.model import create_model, reference
from ttt.model.decode import Decoder
from ttt.model.params import param_counts
from ttt.model.transformer import abstract_model
from ttt.train.flops import flops_per_token, peak_flops
from ttt.train.importer import write_reference_checkpoint
from ttt.train.optim import hyper
from ttt.train.step import init_opt_state, make_eval_step, make_train_step, uses_inner_loop


@dataclass
class BenchRow:
    mode: str
    preset: str
    mixer: str
    seq_len: int
    batch: int
    step_s: float  # median
    step_s_min: float
    step_s_max: float
    tokens_per_s: float
    compile_s: float
    mfu: float | None
    peak_mem_gb: float | None
    device: str
    remat: str
    attention: str = "auto"
    cache_phases: int = 1
    chunk_attention: str = "dense"

    def as_dict(self) -> dict:
        return asdict(self)


def _random_batch(cfg: Config, seed: int = 0):
    b, t, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = jax.random.randint(jax.random.key(seed), (b, t + 1), 0, v)
    return tokens[:, :-1], tokens[:, 1:], jnp.ones((b, t), bool)


def compiled_bytes(compiled) -> int | None:
    """The compiled step's own device memory from XLA's buffer assignment: arguments and
    outputs (less what is donated and aliased) plus temporaries. Unlike the allocator's
    `peak_bytes_in_use`, which only ever grows within a process, it belongs to this row
    alone. (`peak_memory_in_bytes` is not used: on CPU it reports the arguments only.)"""
    m = compiled.memory_analysis()
    if m is None:
        return None
    used = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return used + m.temp_size_in_bytes


def _peak_mem_gb(compiled) -> float | None:
    used = compiled_bytes(compiled)
    return None if used is None else used / 2**30


def bench_memory(cfg: Config) -> dict:
    """`ttt.estimate`'s memory of `cfg`'s train step against XLA's (`train_step_bytes`)
    on this machine's backend."""
    from ttt.estimate import train_memory  # deferred: only this bench needs the estimate

    backend = jax.default_backend()
    xla = train_step_bytes(cfg)
    estimate = train_memory(cfg, backend=backend).total
    return {
        "preset": cfg.preset,
        "mixer": cfg.model.mixer,
        "remat": cfg.model.remat,
        "seq_len": cfg.data.seq_len,
        "batch": cfg.data.batch_size,
        "estimate_gb": estimate / 2**30,
        "xla_gb": None if xla is None else xla / 2**30,
        "ratio": None if xla is None else estimate / xla,
    }


def train_step_bytes(cfg: Config) -> int | None:
    """`compiled_bytes` of `cfg`'s train step, compiled from shapes alone: nothing is
    allocated or run (what `ttt.estimate` is held to)."""
    graphdef, params = nnx.split(abstract_model(cfg.model))
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    batch = (tokens, tokens, jax.ShapeDtypeStruct((b, t), jnp.bool_))
    opt_state = jax.eval_shape(lambda p: init_opt_state(cfg, p), params)
    args = (params, opt_state, batch, hyper(cfg, 0))
    return compiled_bytes(make_train_step(cfg, graphdef).lower(*args).compile())


def bench_one(cfg: Config, mode: str, steps: int = 5, warmup: int = 1) -> BenchRow:
    """Compile once (timed), run `warmup` untimed steps, then time `steps` steps."""
    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
    batch = _random_batch(cfg)
    if mode == "train":
        fn = make_train_step(cfg, graphdef)
        opt_state = init_opt_state(cfg, params)
        args = [params, opt_state, batch, hyper(cfg, 0)]
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0

        def run():
            args[0], args[1], metrics = compiled(*args)
            return metrics["loss"]
    else:
        fn = make_eval_step(cfg, graphdef)
        args = [params, batch, jnp.float32(cfg.ttt.inner_lr)]
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0

        def run():
            return compiled(*args)[1]

    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    device = jax.local_devices()[0]
    training = mode == "train"
    flops = flops_per_token(cfg, training=training, inner=uses_inner_loop(cfg, training))
    peak = peak_flops(device.device_kind, cfg.train.peak_flops)
    n_dev = len(jax.local_devices())
    return BenchRow(
        mode=mode,
        preset=cfg.preset,
        mixer=cfg.model.mixer,
        seq_len=cfg.data.seq_len,
        batch=cfg.data.batch_size,
        step_s=med,
        step_s_min=min(times),
        step_s_max=max(times),
        tokens_per_s=tokens / med,
        compile_s=compile_s,
        mfu=None if peak is None else flops * tokens / med / (peak * n_dev),
        peak_mem_gb=_peak_mem_gb(compiled),
        device=device.device_kind,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        cache_phases=cfg.ttt.cache_phases,
        chunk_attention=cfg.ttt.chunk_attention,
    )


def bench_decode(cfg: Config, tokens: int = 64, warmup: int = 4) -> BenchRow:
    """One token at a time after a random prompt of `data.seq_len` tokens: the mean
    latency per generated token over `tokens` steps (a ttt_e2e inner step every
    `ttt.chunk` of them is included, so time at least one chunk's worth), and min/max
    single-token latencies. `compile_s` is the prefill's and the token step's compile."""

    graphdef, params = nnx.split(create_model(cfg.model, seed=cfg.train.seed))
    context = cfg.data.seq_len
    prompt = jax.random.randint(jax.random.key(0), (context,), 0, cfg.model.vocab_size)
    decoder = Decoder(cfg, graphdef, context + warmup + tokens + 1, bos_id=-1)
    t0 = time.perf_counter()
    state, logits, _ = decoder.read(params, prompt)  # compiles the prefill and the step
    jax.block_until_ready(logits)
    compile_s = time.perf_counter() - t0
    times, t = [], context
    for i in range(warmup + tokens):
        start = time.perf_counter()
        state, logits = decoder.feed(params, state, int(jnp.argmax(logits)), t)
        jax.block_until_ready(logits)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        t += 1
    mean = statistics.fmean(times)
    return BenchRow(
        mode="decode",
        preset=cfg.preset,
        mixer=cfg.model.mixer,
        seq_len=context,
        batch=1,
        step_s=mean,
        step_s_min=min(times),
        step_s_max=max(times),
        tokens_per_s=1 / mean,
        compile_s=compile_s,
        mfu=None,
        peak_mem_gb=None,
        device=jax.local_devices()[0].device_kind,
        remat=cfg.model.remat,
        attention=cfg.model.attention,
        cache_phases=cfg.ttt.cache_phases,
        chunk_attention=cfg.ttt.chunk_attention,
    )


def format_table(rows: list[BenchRow]) -> str:
    head = (
        f"{'mode':7} {'preset':6} {'mixer':14} {'T':>7} {'B':>3} {'step s':>9} {'min..max':>17} "
        f"{'tok/s':>10} {'compile s':>9} {'MFU':>6} {'mem GB':>7}  ratio"
    )
    lines = [head]
    base = {(r.mode, r.preset, r.seq_len): r.step_s for r in rows if r.mixer == "full"}
    for r in rows:
        ref = base.get((r.mode, r.preset, r.seq_len))
        ratio = f"{r.step_s / ref:.2f}x full" if ref else ""
        variant = [f"remat={r.remat}"] * (r.remat != "none")
        variant += [f"attention={r.attention}"] * (r.attention != "auto")
        variant += [f"cache_phases={r.cache_phases}"] * (r.cache_phases != 1)
        variant += [f"chunk_attention={r.chunk_attention}"] * (r.chunk_attention != "dense")
        ratio = " ".join([ratio, *variant])
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        mem = "-" if r.peak_mem_gb is None else f"{r.peak_mem_gb:.3f}"
        lines.append(
            f"{r.mode:7} {r.preset:6} {r.mixer:14} {r.seq_len:7d} {r.batch:3d} {r.step_s:9.4f} "
            f"{r.step_s_min:8.4f}..{r.step_s_max:<8.4f} {r.tokens_per_s:10.0f} {r.compile_s:9.2f} "
            f"{mfu:>6} {mem:>7}  {ratio}"
        )
    return "\n".join(lines)


def bench_compile_cache(cfg: Config, cache_dir) -> dict:
    """Cold compile of the train step, then the step of a config that differs only in
    learning rates (outer and inner), with the caches warm. Both go through the path a
    trial takes (`compile_cache.compiled`): what a new trial waits before its first step."""

    compile_cache.enable(cache_dir)
    lr_only = cfg.replace(**{"train.lr": cfg.train.lr / 3, "ttt.inner_lr": cfg.ttt.inner_lr / 2})
    times = []
    for c in (cfg, lr_only):
        graphdef, params = nnx.split(create_model(c.model, seed=c.train.seed))
        args = (params, init_opt_state(c, params), _random_batch(c), hyper(c, 0))
        t0 = time.perf_counter()
        compile_cache.compiled("train", c, make_train_step(c, graphdef), args)
        times.append(time.perf_counter() - t0)
    return {
        "preset": cfg.preset,
        "mixer": cfg.model.mixer,
        "cold_s": times[0],
        "warm_lr_only_s": times[1],
        "ratio": times[1] / times[0],
    }


# Runs in a fresh interpreter: the `ttt` command line given as argv (or only the
# imports, with none), then its own peak resident memory on stderr's last line. VmHWM,
# not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report
# its parent's size.
_PEAK_RSS = """
import sys
try:
    import flax.nnx, orbax.checkpoint, ttt.cli, ttt.train.importer
    if len(sys.argv) > 1:
        ttt.cli.main(sys.argv[1:])
finally:
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()
    print(int(status[0]) / 1024, file=sys.stderr)
"""


def _peak_rss_mb(argv: list[str]) -> float:
    """Peak resident memory (MB) of a fresh process running `ttt ARGV` (argv empty: one
    that only imports the code)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *argv], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    if done.returncode != 0:
        raise RuntimeError(f"ttt {' '.join(argv)} failed: {lines[-2:] if lines else ''}")
    return float(lines[-1])


def bench_import(cfg, workdir) -> dict:
    """Write a reference-format checkpoint of `cfg`'s shapes (random weights), then import
    it in a fresh process; its peak RSS against the weights' size and against a process
    that only imports the same code."""

    _, state = nnx.split(create_model(cfg.model))
    weights = reference.from_ours(state.to_pure_dict())
    size_mb = sum(x.nbytes for x in jax.tree.leaves(weights)) / 2**20
    ckpt = write_reference_checkpoint(workdir / "ref", 1, weights)
    del weights, state
    argv = ["import", "reference", str(ckpt), "--out", str(workdir / "run"), "--bos-id", "0"]
    argv += [f"{k}={v}" for k, v in cfg.flat().items() if k.startswith("model.")]
    peak, baseline = _peak_rss_mb(argv), _peak_rss_mb([])
    return {
        "preset": cfg.preset,
        "params": param_counts(cfg.model)["total"],
        "weights_mb": round(size_mb, 1),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(baseline, 1),
        "import_mb": round(peak - baseline, 1),
        "import_over_weights": round((peak - baseline) / size_mb, 2),
    }
