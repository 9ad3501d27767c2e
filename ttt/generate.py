"""`ttt generate RUN`: continue a prompt with a run's weights, learning as it reads."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from ttt.data.loader import dataset_root
from ttt.data.prepare import read_meta
from ttt.data.tokenizer import TextTokenizer, load_tokenizer
from ttt.errors import UserError
from ttt.rundir import require_bos
from ttt.train.checkpoint import read_run_info

# deferred imports: ttt.evaluation and ttt.model.decode are imported inside the functions
# that use them, because ttt.evaluation's package imports ttt.niah, which imports
# `open_run` from this module.


def dataset_tokenizer(cfg) -> str | None:
    """The tokenizer that prepared the run's dataset, as its meta.json names it: a file
    inside the dataset (newer datasets keep a copy), else the path it was prepared with."""
    try:
        root = dataset_root(cfg.data.source, cfg.data.cache_dir)
    except UserError:
        return None
    name = (read_meta(root) or {}).get("tokenizer")
    if name in (None, "bytes"):
        return name
    inside = root / name
    return str(inside) if inside.is_file() else name


def open_run(run_dir: Path, spec: str | None = None, required: bool = True):
    """(config, run.json, tokenizer) of a run that is to read and write text: `spec` (a
    tokenizer.json, or bytes) if given, else the one that prepared the run's dataset. The
    tokenizer's BOS must be the run's. With `required` off, a run without a usable
    tokenizer gives None (it can still take and give token ids)."""
    from ttt.evaluation.weights import run_config

    cfg, info = run_config(run_dir), read_run_info(run_dir)
    given = spec is not None
    if spec is None:
        spec = dataset_tokenizer(cfg)
        if spec is None:
            if not required:
                return cfg, info, None
            raise UserError(
                f"--tokenizer: the run's dataset ({cfg.data.source}) names no tokenizer; "
                "give the tokenizer.json the run was trained with, or token ids (--prompt-ids)"
            )
    tok = load_tokenizer(spec)
    if not (required or given) and info.get("bos_id", tok.bos_id) != tok.bos_id:
        return cfg, info, None  # ids in, ids out
    where = "--tokenizer" if given else "the dataset's tokenizer"
    hint = "give the run's own tokenizer with --tokenizer, or token ids with --prompt-ids"
    require_bos(info.get("bos_id"), tok.bos_id, f"{where} ({spec})", hint)
    return cfg, info, tok


def read_prompt(path: Path, tok: TextTokenizer, bos: bool) -> list[int]:
    """Token ids from a text file (tokenized, BOS first unless `bos` is off: the model
    saw every document start with one) or a .npy/.npz of ids (taken as they are)."""
    if not path.is_file():
        raise UserError(f"--prompt-file={str(path)!r}: no such file")
    if path.suffix in (".npy", ".npz"):
        return read_ids(path, "--prompt-file")
    ids = ([tok.bos_id] if bos else []) + tok.encode(path.read_text(errors="replace"))
    if not ids:
        raise UserError(f"--prompt-file={str(path)!r}: is empty")
    return ids


def read_ids(path: Path, flag: str) -> list[int]:
    """One sequence of integer token ids (.npy or .npz), taken as they are."""
    from ttt.evaluation.measure import load_ids

    if not path.is_file():
        raise UserError(f"{flag}={str(path)!r}: no such file")
    ids = load_ids(path, flag)
    if ids.ndim != 1 or ids.size == 0:
        raise UserError(f"{flag}={str(path)!r}: shape {ids.shape}; expected one sequence (T,)")
    return [int(i) for i in ids]


class Stream:
    """Writes the new text as tokens arrive. A byte tokenizer can split a character over
    tokens, so text is written only up to the last whole character; without a tokenizer
    the ids themselves are written."""

    def __init__(self, tok: TextTokenizer | None, out=None):
        self.tok, self.out = tok, out or sys.stdout
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        if self.tok is None:
            self.out.write(f"{token} ")
        else:
            text = self.tok.decode(self.tokens)
            if text.endswith("\ufffd") or not text.startswith(self.shown):
                return  # half a character, or a tokenizer that rewrites earlier text
            self.out.write(text[len(self.shown) :])
            self.shown = text
        self.out.flush()

    def close(self) -> None:
        if self.tok is not None:
            text = self.tok.decode(self.tokens)
            self.out.write(text[len(self.shown) :] if text.startswith(self.shown) else "")
        self.out.write("\n")
        self.out.flush()


def generate_from_run(
    run_dir: Path,
    prompt_file: Path | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer: str | None = None,
    bos: bool = True,
    prompt_ids: Path | None = None,
    on_token: Callable[[int], None] | None = None,
    tokenizer_ready: Callable[[TextTokenizer | None], None] | None = None,
):
    """(Generation, prompt ids, tokenizer or None). `on_token` sees each new token as it
    is made; `tokenizer_ready` is told which tokenizer will decode them."""
    from ttt.evaluation.weights import load_weights
    from ttt.model.decode import Decoder, generate

    cfg, info, tok = open_run(run_dir, tokenizer, required=prompt_ids is None)
    prompt = (
        read_ids(prompt_ids, "--prompt-ids") if prompt_ids else read_prompt(prompt_file, tok, bos)
    )
    flag = "--prompt-ids" if prompt_ids else "--prompt-file"
    vocab = cfg.model.vocab_size
    if max(prompt) >= vocab or min(prompt) < 0:
        raise UserError(f"{flag}: ids outside the model's vocabulary 0..{vocab - 1}")
    if tokenizer_ready is not None:
        tokenizer_ready(tok)
    bos_id = tok.bos_id if tok is not None else info.get("bos_id", 0)
    run = load_weights(cfg, run_dir)
    decoder = Decoder(cfg, run.graphdef, len(prompt) + max_new_tokens, bos_id)
    out = generate(
        decoder,
        run.params,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=(bos_id,),
        on_token=on_token,
    )
    return out, prompt, tok
