"""Decoding: teacher-forced decoding gives `ttt eval`'s per-token NLL for every mixer (the
inner steps of ttt_e2e included), whatever the prompt length; greedy decoding is
deterministic; each step compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt.config import load_config
from ttt.model import create_model
from ttt.model.decode import Decoder, generate, sample
from ttt.model.loop import sequence_nll

BOS, T = 256, 64


# Table 1's multi-head rung: fast weights in every block, split into heads
MULTIHEAD = "ttt_e2e:model.ttt_layers=4,model.fast_heads=4"
# TTT-KVB with a per-token LR large enough that its updates move the NLL by far more
# than the tolerance (test_kvb_updates_are_seen)
KVB = "ttt_kvb:model.kvb_lr=1.0"


def setup(mixer: str, inner_lr: float = 1.0):
    mixer, _, extra = mixer.partition(":")
    cfg = load_config(
        "pico",
        [f"model.mixer={mixer}", "model.window=24", "ttt.chunk=16", f"data.seq_len={T}"]
        + [f"ttt.inner_lr={inner_lr}", *filter(None, extra.split(","))],
    )
    model = create_model(cfg.model, seed=1)
    tokens = np.random.default_rng(0).integers(0, 256, T + 1).astype(np.int32)
    tokens[20] = BOS  # a masked target inside the second chunk
    return cfg, model, tokens


def eval_nll(cfg, model, tokens) -> np.ndarray:
    inputs, targets = jnp.asarray(tokens[None, :-1]), jnp.asarray(tokens[None, 1:])
    inner = cfg.model.mixer == "ttt_e2e"
    _, nll = sequence_nll(
        model,
        (inputs, targets, targets != BOS),
        jnp.float32(cfg.ttt.inner_lr),
        cfg.ttt,
        inner=inner,
    )
    return np.asarray(nll[0])


def teacher_forced(cfg, model, tokens, prompt_len: int, dec=None) -> np.ndarray:
    """Prefill `prompt_len` tokens, then feed the true tokens one at a time."""
    graphdef, params = nnx.split(model)
    dec = dec or Decoder(cfg, graphdef, max_len=T + 1, bos_id=BOS)
    state, nll, done = dec.prefill(params, tokens[:prompt_len])
    got = list(nll)
    for t in range(done, T):
        state, logits = dec.feed(params, state, int(tokens[t]), t)
        got.append(float(-jax.nn.log_softmax(logits)[tokens[t + 1]]))
    return np.asarray(got)


@pytest.mark.parametrize(
    "mixer",
    ["full", "swa", "hybrid", "gated_deltanet", "mamba2", KVB, "ttt_e2e", MULTIHEAD],
)
def test_teacher_forced_decoding_equals_eval(mixer):
    """Prompts of 1 token (all decoded), a whole chunk, one past it and mid-chunk."""
    cfg, model, tokens = setup(mixer)
    want = eval_nll(cfg, model, tokens)
    dec = Decoder(cfg, nnx.split(model)[0], max_len=T + 1, bos_id=BOS)  # one compile
    for prompt_len in (1, 16, 17, 40):
        got = teacher_forced(cfg, model, tokens, prompt_len, dec)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"prompt of {prompt_len}")
        # reading the prompt alone gives the NLL of its own tokens
        _, _, read = dec.read(nnx.split(model)[1], tokens[:prompt_len])
        np.testing.assert_allclose(read, want[: prompt_len - 1], atol=2e-5)


def test_decoding_keeps_learning():
    """The control: with the inner steps switched off (inner_lr 0) decoding gives another
    NLL than evaluation with them, so the equivalence above sees the updates."""
    cfg, model, tokens = setup("ttt_e2e")
    off, _, _ = setup("ttt_e2e", inner_lr=0.0)
    gap = np.abs(teacher_forced(off, model, tokens, 1) - eval_nll(cfg, model, tokens))
    assert gap[:16].max() < 1e-5  # the first chunk precedes every update
    assert gap[16:].max() > 1e-3


def test_kvb_updates_are_seen():
    """The control for TTT-KVB: with its LR near zero the NLL is the same on the first
    chunk (no update precedes it) and differs after it, by far more than the tolerance
    that decoding is held to."""
    cfg, model, tokens = setup(KVB)
    low, _, _ = setup("ttt_kvb:model.kvb_lr=1e-9")
    gap = np.abs(
        eval_nll(cfg, model, tokens) - eval_nll(low, create_model(low.model, seed=1), tokens)
    )
    assert gap[:16].max() < 1e-6
    assert gap[16:].max() > 1e-2


def test_causality_and_one_compile_per_shape():
    cfg, model, tokens = setup("ttt_e2e")
    graphdef, params = nnx.split(model)
    dec = Decoder(cfg, graphdef, max_len=T + 1, bos_id=BOS)
    other = tokens.copy()
    other[40:] = (other[40:] + 7) % 256  # a different future
    runs = []
    for seq in (tokens, other):
        state, _, done = dec.prefill(params, seq[:17])
        logits = []
        for t in range(done, 40):
            state, out = dec.feed(params, state, int(seq[t]), t)
            logits.append(np.asarray(out))
        runs.append(np.stack(logits))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert len(dec._feed.programs) == 1 and len(dec._prefill.programs) == 1


def test_greedy_is_deterministic_and_sampling_is_seeded():
    cfg, model, tokens = setup("ttt_e2e")
    graphdef, params = nnx.split(model)
    dec = Decoder(cfg, graphdef, max_len=80, bos_id=BOS)
    a = generate(dec, params, tokens[:30], 20).tokens
    b = generate(dec, params, tokens[:30], 20).tokens
    assert a == b and len(a) == 20
    s1 = generate(dec, params, tokens[:30], 20, temperature=1.0, seed=3).tokens
    s2 = generate(dec, params, tokens[:30], 20, temperature=1.0, seed=3).tokens
    s3 = generate(dec, params, tokens[:30], 20, temperature=1.0, seed=4).tokens
    assert s1 == s2 and s1 != s3
    stop = generate(dec, params, tokens[:30], 20, stop=(a[3],)).tokens
    assert stop == a[: a.index(a[3]) + 1]


def test_top_p_keeps_the_smallest_likely_set():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = {sample(logits, 1.0, 0.7, rng) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert sample(logits, 0.0, 0.7, rng) == 0
    assert {sample(logits, 1.0, 1.0, rng) for _ in range(400)} == {0, 1, 2, 3}


def test_generate_cli(tmp_path, corpus, capsys):
    """`ttt generate` on a run (written here as an import of fresh pico weights): text
    in, text out, one line of stats; usage mistakes are one line."""
    from ttt.cli import main
    from ttt.data.tokenizer import byte_tokenizer
    from ttt.model import reference
    from ttt.train.importer import import_reference, write_reference_checkpoint

    cfg = load_config("pico", ["model.ttt_layers=2"])
    _, state = nnx.split(create_model(cfg.model))
    write_reference_checkpoint(tmp_path / "ref", 1, reference.from_ours(state.to_pure_dict()))
    run = tmp_path / "run"
    import_reference(str(tmp_path / "ref"), run, None, [f"data.source={corpus}"], bos_id=BOS)
    (tmp_path / "p.txt").write_text("def main():\n    return")

    def cli(*args):
        with pytest.raises(SystemExit) as exc:
            main(["generate", str(run), *args])
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err.strip()

    ids = tmp_path / "new.npy"
    code, out, err = cli(
        "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "5", "--out-ids", str(ids)
    )
    assert code == 0, err
    assert "new tokens after a prompt of 23" in err  # BOS + 22 bytes
    assert "first token after" in err and "ms/token" in err
    new = np.load(ids)
    text = byte_tokenizer().decode(new.tolist())
    # Streamed as made: what was written is the decoded new tokens, then a newline.
    assert new.dtype == np.int32 and out == text + "\n"
    # The same continuation from ids alone (a run without a tokenizer): ids out.
    prompt = np.asarray([BOS, *b"def main():\n    return"], np.int32)
    np.save(tmp_path / "prompt.npy", prompt)
    np.savez(tmp_path / "prompt.npz", tokens=prompt)
    for given in ("prompt.npy", "prompt.npz"):
        code, out, err = cli("--prompt-ids", str(tmp_path / given), "--max-new-tokens", "5")
        assert code == 0, err
        assert out == text + "\n"
    np.save(tmp_path / "float.npy", prompt.astype(np.float32))
    np.save(tmp_path / "two.npy", np.stack([prompt, prompt]))
    p = str(tmp_path / "p.txt")
    for args, message in [
        (["--prompt-file", str(tmp_path / "no.txt")], "no such file"),
        (["--prompt-file", p, "--top-p", "0"], "--top-p=0.0"),
        (["--prompt-file", p, "--max-new-tokens", "0"], "must be >= 1"),
        (["--prompt-file", p, "--tokenizer", "x/y"], "no such local file"),
        (["--prompt-file", p, "--temperature", "nan"], "--temperature=nan: must be a number"),
        (["--prompt-file", p, "--seed", "-1"], "--seed=-1: must be >= 0"),
        (["--prompt-file", p, "--out-ids", str(tmp_path / "o.txt")], "must name a .npy file"),
        (["--prompt-file", str(tmp_path / "float.npy")], "dtype float32; token ids are integers"),
        (["--prompt-ids", str(tmp_path / "two.npy")], "expected one sequence (T,)"),
        (["--prompt-ids", str(tmp_path / "prompt.npy"), "--prompt-file", p], "one of"),
        (["--max-new-tokens", "3"], "give the prompt with one of --prompt-file"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def step_flops(mixer: str, max_len: int) -> float:
    cfg, model, _ = setup(mixer)
    graphdef, params = nnx.split(model)
    dec = Decoder(cfg, graphdef, max_len=max_len, bos_id=BOS)
    state = dec.empty(params)
    compiled = dec._feed.jitted.lower(params, state, jnp.int32(1), jnp.int32(0)).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_token_step_cost_is_flat_in_context():
    """XLA's own count of a token step's FLOPs: the same after 64 or 2048 tokens for swa
    and ttt_e2e (window-sized caches) and the recurrent mixers (a fixed state), growing
    with the context for full attention and the hybrid (its full layers)."""
    for mixer in ("swa", "ttt_e2e", "gated_deltanet", "mamba2"):
        assert step_flops(mixer, 64) == step_flops(mixer, 2048), mixer
    for mixer in ("full", "hybrid"):
        assert step_flops(mixer, 2048) > 2 * step_flops(mixer, 64), mixer


def test_decode_bench_rows_feed_the_decode_latency_figure(tmp_path, capsys):
    import polars as pl

    from analysis.figures import build_all
    from ttt.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["bench", "decode", "pico", "--contexts", "32,48", "--tokens", "2"]
    args += ["--mixers", "full,swa"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "ttt.chunk=16", "--tracking-uri", uri])
    assert exc.value.code == 0
    assert "logged 4 rows" in capsys.readouterr().out
    written, _ = build_all(uri, tmp_path / "figs", only=["decode_latency"])
    table = pl.read_parquet(written["decode_latency"][-1])
    assert sorted(table["method"].unique()) == ["full", "swa"]
    assert sorted(table["seq_len"].unique()) == [32, 48]
    for bad, message in [
        (["--contexts", "a,b"], "--contexts='a,b'"),
        (["--tokens", "0"], "--tokens=0"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "decode", "pico", *bad])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and message in err, err
