"""`ttt generate RUN`: continue a prompt with a run's weights, learning as it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ttt.data.tokenizer import TextTokenizer, load_tokenizer
from ttt.errors import UserError


def open_run(run_dir: Path, spec: str | None = None):
    """(config, run.json, tokenizer) of a run that is to read and write text: `spec` (a
    tokenizer.json, or bytes) if given, else the one that prepared the run's dataset (its
    meta.json). The tokenizer's BOS must be the run's."""
    from ttt.data.loader import dataset_root
    from ttt.data.prepare import read_meta
    from ttt.train.checkpoint import read_run_info
    from ttt.train.evaluate_run import run_config

    cfg, info = run_config(run_dir), read_run_info(run_dir)

    if spec is None:
        try:
            meta = read_meta(dataset_root(cfg.data.source, cfg.data.cache_dir)) or {}
        except UserError:
            meta = {}
        if "tokenizer" not in meta:
            raise UserError(
                f"--tokenizer: the run's dataset ({cfg.data.source}) names no tokenizer; "
                "give the tokenizer.json the run was trained with"
            )
        spec = meta["tokenizer"]
    tok = load_tokenizer(spec)
    bos = info.get("bos_id", tok.bos_id)
    if tok.bos_id != bos:
        raise UserError(f"--tokenizer={spec!r}: its BOS id is {tok.bos_id}, the run's is {bos}")
    return cfg, info, tok


def read_prompt(path: Path, tok: TextTokenizer, bos: bool) -> list[int]:
    """Token ids from a text file (tokenized, BOS first unless `bos` is off: the model
    saw every document start with one) or a .npy of ids (taken as they are)."""
    if not path.is_file():
        raise UserError(f"--prompt-file={str(path)!r}: no such file")
    if path.suffix == ".npy":
        ids = np.load(path).reshape(-1).tolist()
    else:
        ids = ([tok.bos_id] if bos else []) + tok.encode(path.read_text(errors="replace"))
    if not ids:
        raise UserError(f"--prompt-file={str(path)!r}: is empty")
    return [int(i) for i in ids]


def generate_from_run(
    run_dir: Path,
    prompt_file: Path,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer: str | None = None,
    bos: bool = True,
):
    """(text, Generation, prompt ids)."""
    from ttt.model.decode import Decoder, generate
    from ttt.train.evaluate_run import load_weights

    cfg, _, tok = open_run(run_dir, tokenizer)
    prompt = read_prompt(prompt_file, tok, bos)
    vocab = cfg.model.vocab_size
    if max(prompt) >= vocab or min(prompt) < 0:
        raise UserError(f"--prompt-file: ids outside the model's vocabulary 0..{vocab - 1}")
    run = load_weights(cfg, run_dir)
    decoder = Decoder(cfg, run.graphdef, len(prompt) + max_new_tokens, tok.bos_id)
    out = generate(
        decoder,
        run.params,
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=(tok.bos_id,),
    )
    return tok.decode(out.tokens), out, prompt
