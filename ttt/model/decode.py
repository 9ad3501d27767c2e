"""Decoding: prefill a prompt, then one token at a time, for every mixer.

Every attention layer keeps a KV cache of fixed size, so each step compiles once:
`full` and `hybrid` keep every position (prompt + new tokens; a hybrid's SWA layers mask
theirs to the window), `swa` and all layers of `ttt_e2e` the last `window`. The
recurrent mixers (`gated_deltanet`, `mamba2`) keep their state instead: the same size
at any context length. `ttt_e2e` keeps learning while it generates: it buffers the current
chunk's inputs and prefix outputs, and as soon as the token after the chunk is known
(that chunk's last target) it runs the same inner step as training and evaluation
(`Suffix.update`, from the suffix KV cache as it was at the chunk's start). Every later
position then sees the updated fast weights, exactly as in `ttt eval`, which a
teacher-forced decode reproduces (tests/test_decode.py). `ttt_kvb` keeps a window-sized
KV cache and, per layer, its fast weights and the current chunk's keys, values and LRs;
its update needs no target, so it runs as soon as the chunk's last token has been read
(`ttt.model.kvb.kvb_step`).

One sequence at a time. The prompt's complete chunks are prefilled in parallel (the
inner loop of evaluation); the rest of the prompt, up to one chunk, goes token by token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt import compile_cache
from ttt.config import Config
from ttt.model.kernels import Kernels, resolve
from ttt.model.kvb import FastState
from ttt.model.layers import FastParam
from ttt.model.loop import Suffix, carry_window, hidden_nll, suffix_loop
from ttt.model.recurrent import RecurrentState
from ttt.model.transformer import (
    TTTModel,
    attention_window,
    full_layers,
    scan_blocks,
    scan_cached,
    split_layers,
)
from ttt.shapes import RECURRENT


@jax.tree_util.register_dataclass
@dataclass
class Cache:
    """Keys and values of the last `size` positions, per layer: (layers, size, H, D);
    `pos` (size,) their positions, -1 for an empty slot (masked)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def empty(cls, layers: int, size: int, heads: int, head_dim: int, dtype) -> Cache:
        zeros = jnp.zeros((layers, size, heads, head_dim), dtype)
        return cls(zeros, zeros, jnp.full((size,), -1, jnp.int32))

    def push(self, k, v, pos) -> Cache:
        """Append new positions, dropping the oldest."""
        return Cache(
            carry_window(self.k, k, axis=1),
            carry_window(self.v, v, axis=1),
            carry_window(self.pos, pos.astype(jnp.int32), axis=0),
        )

    @property
    def triple(self):
        return self.k, self.v, self.pos


@jax.tree_util.register_dataclass
@dataclass
class State:
    prefix: Cache | None
    suffix: Cache | None  # live cache of the TTT layers
    start: Cache | None  # the TTT layers' cache as it was when the current chunk began
    fast: dict | None  # the prime-MLP weights, as updated so far
    chunk_h: jax.Array | None  # (chunk, d): prefix outputs of the current chunk
    chunk_in: jax.Array | None  # (chunk,): its input tokens
    filled: jax.Array | None = None  # positions of the current chunk seen so far
    kvb: FastState | None = None  # ttt_kvb: every layer's fast state, stacked


class Decoder:
    """`prefill(params, prompt)` then `feed(params, state, token, t)` per position.

    `max_len` bounds prompt + generated tokens (it sizes `full`'s cache). Each is jitted
    once per shape: the token step (with the chunk update inside it, under `lax.cond`) and
    the prefill, per prompt length in whole chunks."""

    def __init__(
        self, cfg: Config, graphdef, max_len: int, bos_id: int, kernels: Kernels | None = None
    ):
        self.cfg, self.graphdef, self.max_len, self.bos = cfg, graphdef, max_len, bos_id
        self.kernels = kernels or resolve(cfg, first_order=True)
        m = cfg.model
        self.ttt = m.mixer == "ttt_e2e"
        self.kvb = m.mixer == "ttt_kvb"
        # Prefill whole chunks: ttt_e2e's inner loop and ttt_kvb's fast state then stand
        # at a chunk boundary, where token-by-token decoding takes over.
        self.chunk = cfg.ttt.chunk if self.ttt else m.kvb_chunk if self.kvb else 1
        self.window = attention_window(m)
        self.full = full_layers(m)  # hybrid: the layers that attend fully
        self.recurrent = m.mixer in RECURRENT
        self.prefix_size = max_len if self.window is None or self.full is not None else self.window
        self.heads, self.head_dim = m.heads, m.width // m.heads

        # From the executable cache: a second `ttt generate` on the run starts in seconds.
        # The name carries what the functions bake in as constants beyond the shape key.
        baked = f"max_len={max_len},bos={bos_id},inner_lr={cfg.ttt.inner_lr},{self.kernels}"
        self._feed = compile_cache.CachedStep(
            f"decode-feed[{baked}]", cfg, jax.jit(self._feed_fn), by_shape=True
        )
        self._prefill = compile_cache.CachedStep(
            f"decode-prefill[{baked}]", cfg, jax.jit(self._prefill_fn), by_shape=True
        )

    # -- pieces -------------------------------------------------------------------------

    def _model(self, params) -> TTTModel:
        return nnx.merge(self.graphdef, params)

    def _suffix(self, model: TTTModel) -> Suffix:
        graphdef, _, slow = nnx.split(model.suffix, FastParam, ...)
        return Suffix(model, graphdef, slow, self.kernels)

    def _cache(self, model, layers: int, size: int) -> Cache:
        dtype = model.embed_tokens(jnp.zeros((1,), jnp.int32)).dtype
        return Cache.empty(layers, size, self.heads, self.head_dim, dtype)

    def _recurrent(self, model, layers: int) -> RecurrentState:
        """Every layer's empty state, stacked on the layer axis."""
        dtype = model.embed_tokens(jnp.zeros((1,), jnp.int32)).dtype
        one = model.prefix.rnn.empty((), dtype)  # from the layer's static sizes
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (layers, *a.shape)), one)

    def empty(self, params) -> State:
        model = self._model(params)
        n_prefix, n_suffix = split_layers(self.cfg.model)
        if self.recurrent:
            return State(self._recurrent(model, n_prefix), None, None, None, None, None, None)
        prefix = self._cache(model, n_prefix, self.prefix_size) if n_prefix else None
        if self.kvb:  # from the layers' stacked initial weights
            kvb = model.prefix.attn.empty((), prefix.k.dtype)
            return State(prefix, None, None, None, None, None, None, kvb=kvb)
        if not self.ttt:
            return State(prefix, None, None, None, None, None, None)
        suffix = self._cache(model, n_suffix, self.window)
        fast = nnx.state(model.suffix, FastParam)
        chunk_h = jnp.zeros((self.chunk, self.cfg.model.width), suffix.k.dtype)
        chunk_in = jnp.zeros((self.chunk,), jnp.int32)
        return State(prefix, suffix, suffix, fast, chunk_h, chunk_in, jnp.int32(0))

    def _step_fn(self, params, state: State, token, t):
        """Position t: its logits (vocab,), with its keys and values cached."""
        model = self._model(params)
        pos = t[None]
        x = model.embed_tokens(token[None])
        prefix, suffix, chunk_h, chunk_in = (
            state.prefix,
            state.suffix,
            state.chunk_h,
            state.chunk_in,
        )
        if self.recurrent:
            graphdef, layers = nnx.split(model.prefix)
            x, prefix = scan_cached(graphdef, (layers,), x, pos, prefix, self.window)
        elif self.kvb:
            graphdef, layers = nnx.split(model.prefix)
            cache = (prefix.triple, state.kvb)
            x, ((k, v), kvb) = scan_cached(graphdef, (layers,), x, pos, cache, self.window)
            prefix = prefix.push(k, v, pos)
            state = State(prefix, None, None, None, None, None, None, kvb=kvb)
        elif prefix is not None:
            graphdef, layers = nnx.split(model.prefix)
            x, (k, v) = scan_cached(
                graphdef, (layers,), x, pos, prefix.triple, self.window, full=self.full
            )
            prefix = prefix.push(k, v, pos)
        if self.ttt:
            i = t % self.chunk
            chunk_h = jax.lax.dynamic_update_slice(chunk_h, x.astype(chunk_h.dtype), (i, 0))
            chunk_in = chunk_in.at[i].set(token)
            x, (k, v) = self._suffix(model).forward(state.fast, suffix.triple, x, pos, "dense")
            suffix = suffix.push(k, v, pos)
        logits = model.logits(x)[0].astype(jnp.float32)
        filled = state.filled + 1 if self.ttt else None
        new = State(prefix, suffix, state.start, state.fast, chunk_h, chunk_in, filled, state.kvb)
        return new, logits

    def _update_fn(self, params, state: State, token, t):
        """The inner step on the chunk that ends before position t, whose last target is
        `token` (the token at t)."""
        model = self._model(params)
        targets = jnp.concatenate([state.chunk_in[1:], token[None]])
        positions = t - self.chunk + jnp.arange(self.chunk)
        fast, _, _, _ = self._suffix(model).update(
            state.fast,
            state.start.triple,
            state.chunk_h,
            positions,
            targets,
            targets != self.bos,
            jnp.float32(self.cfg.ttt.inner_lr),
            self.cfg.ttt,
        )
        return State(
            state.prefix,
            state.suffix,
            state.suffix,
            fast,
            state.chunk_h,
            state.chunk_in,
            0 * state.filled,
        )

    def _feed_fn(self, params, state: State, token, t):
        """Position t's token: first the inner step on the chunk it completes (when the
        buffer holds a whole chunk), then its logits."""
        if self.ttt:
            state = jax.lax.cond(
                state.filled == self.chunk,
                lambda s: self._update_fn(params, s, token, t),
                lambda s: s,
                state,
            )
        return self._step_fn(params, state, token, t)

    def _prefill_fn(self, params, tokens):
        """The first L positions of a prompt at once (L a multiple of the chunk), with
        the token after them as the last target. Returns the state at position L and
        the per-token NLL of those L targets."""
        model = self._model(params)
        inputs, targets = tokens[:-1], tokens[1:]
        n = inputs.shape[0]
        positions = jnp.arange(n)
        x = model.embed_tokens(inputs)
        state = self.empty(params)
        prefix = state.prefix
        kvb = None
        if self.recurrent:
            x, prefix = scan_blocks(model.prefix, x, positions, None, keep=1)
        elif self.kvb:
            x, ((k, v), kvb) = scan_blocks(
                model.prefix,
                x,
                positions,
                self.window,
                self.kernels.sequence,
                keep=self.prefix_size,
            )
            pos = jnp.arange(n - self.prefix_size, n)
            prefix = Cache(k, v, jnp.where(pos >= 0, pos, -1).astype(jnp.int32))
        elif prefix is not None:
            x, (k, v) = scan_blocks(
                model.prefix,
                x,
                positions,
                self.window,
                self.kernels.sequence,
                keep=self.prefix_size,
                full=self.full,
            )
            pos = jnp.arange(n - self.prefix_size, n)
            prefix = Cache(k, v, jnp.where(pos >= 0, pos, -1).astype(jnp.int32))
        if not self.ttt:
            nll = hidden_nll(model, x, targets)
            return State(prefix, None, None, None, None, None, None, kvb=kvb), nll
        mask = targets != self.bos
        nll, _, (fast, ck, cv, cpos) = suffix_loop(
            model,
            x[None],
            targets[None],
            mask[None],
            jnp.float32(self.cfg.ttt.inner_lr),
            self.cfg.ttt,
            self.kernels,
            final_state=True,
        )
        suffix = state.suffix.push(ck[0], cv[0], cpos[0])
        fast = jax.tree.map(lambda w: w[0], fast)
        return State(
            prefix, suffix, suffix, fast, state.chunk_h, state.chunk_in, state.filled
        ), nll[0]

    # -- driving ------------------------------------------------------------------------

    def prefill(self, params, prompt) -> tuple[State, np.ndarray, int]:
        """(state, NLL of the prefilled targets, positions prefilled). All but the prompt's
        last 1..chunk tokens go in at once (whole chunks whose last target is known); the
        caller feeds the rest with `feed`."""
        prompt = np.asarray(prompt, np.int32)
        if len(prompt) > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens > max_len {self.max_len}")
        n = (len(prompt) - 1) // self.chunk * self.chunk
        if n == 0:
            return self.empty(params), np.zeros(0), 0
        state, nll = self._prefill(params, jnp.asarray(prompt[: n + 1]))
        return state, np.asarray(nll), n

    def read(self, params, prompt) -> tuple[State, jax.Array, np.ndarray]:
        """The whole prompt: its whole chunks prefilled, the rest fed one at a time.
        Returns the state after it, the logits at its last position, and the NLL of each
        prompt token after the first (what `ttt eval` gives for them)."""
        prompt = [int(t) for t in prompt]
        state, nll, done = self.prefill(params, prompt)
        nll, logits = list(nll), None
        for t in range(done, len(prompt)):
            if logits is not None:  # on the host: no small program to compile per call
                z = np.asarray(logits, np.float64)
                top = z.max()
                nll.append(float(top + np.log(np.exp(z - top).sum()) - z[prompt[t]]))
            state, logits = self.feed(params, state, prompt[t], t)
        return state, logits, np.asarray(nll)

    def feed(self, params, state: State, token: int, t: int) -> tuple[State, jax.Array]:
        """Position t's token: the inner step on the chunk it completes (ttt_e2e), then
        the logits at t (vocab,)."""
        return self._feed(params, state, jnp.int32(token), jnp.int32(t))


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise from softmax(logits / temperature), kept to the
    smallest set of most likely tokens whose probability reaches `top_p`."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.searchsorted(np.cumsum(p[order]), top_p) + 1  # reach top_p, at least one
    kept = order[:keep]
    return int(rng.choice(kept, p=p[kept] / p[kept].sum()))


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prompt_nll: np.ndarray  # NLL of each prompt token after the first, as `ttt eval` gives
    seconds_per_token: float  # decode only, once the token step is compiled (nan: too few)
    first_token_seconds: float = float("nan")  # prompt read, compiles and the first new token


def generate(
    decoder: Decoder,
    params,
    prompt,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: tuple[int, ...] = (),
    on_token=None,
) -> Generation:
    """Continue `prompt` by up to `max_new_tokens`, stopping after a token in `stop`.
    `on_token(token)` sees each new token as soon as it is sampled (a stream that Ctrl-C
    leaves intact up to there)."""

    rng = np.random.default_rng(seed)
    begin = time.perf_counter()
    state, logits, nll = decoder.read(params, prompt)
    new, first, start, timed = [], float("nan"), None, 0
    for t in range(len(prompt), len(prompt) + max_new_tokens):
        token = sample(np.asarray(logits), temperature, top_p, rng)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if len(new) == 1:
            first = time.perf_counter() - begin
        elif start is None:  # the token step's first call compiled it: time from here
            start = time.perf_counter()
        else:
            timed += 1
        if token in stop or t + 1 >= min(decoder.max_len, len(prompt) + max_new_tokens):
            break  # no step past the last token: its time would count against no token
        state, logits = decoder.feed(params, state, token, t)
    per_token = (time.perf_counter() - start) / timed if timed else float("nan")
    return Generation(new, nll, per_token, first)
