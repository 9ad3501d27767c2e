"""`ttt generate RUN --prompt-file F` (or `--prompt-ids F.npy`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import typer

from ttt.errors import Interrupted, UserError

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.


def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory."),
    prompt_file: Path = typer.Option(
        None, "--prompt-file", help="Text to continue (or a .npy of token ids)."
    ),
    prompt_ids: Path = typer.Option(
        None,
        "--prompt-ids",
        help="Token ids to continue (.npy/.npz, one sequence, taken as they are; no "
        "tokenizer needed).",
    ),
    out_ids: Path = typer.Option(None, "--out-ids", help="Write the new token ids here (.npy)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="At most this many."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (>= 0)."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="tokenizer.json (default: the run's dataset's tokenizer)."
    ),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Start the prompt with BOS."),
) -> None:
    """Continue a prompt, writing the text as it is made; ttt_e2e keeps training its prime
    MLPs (ttt_kvb its fast weights) on what it reads and writes, one inner step per
    chunk, exactly as in evaluation."""
    from ttt.generate import Stream, generate_from_run

    if (prompt_file is None) == (prompt_ids is None):
        raise UserError("give the prompt with one of --prompt-file (text) or --prompt-ids (ids)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens}: must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature={temperature}: must be a number >= 0")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p={top_p}: must be in (0, 1]")
    if seed < 0:
        raise UserError(f"--seed={seed}: must be >= 0")
    if out_ids is not None and out_ids.suffix != ".npy":
        raise UserError(f"--out-ids={str(out_ids)!r}: must name a .npy file")
    if out_ids is not None and out_ids.is_dir():
        raise UserError(f"--out-ids={str(out_ids)!r}: is a folder; name a .npy file")

    stream: list[Stream] = []
    try:
        out, prompt, _ = generate_from_run(
            run_dir,
            prompt_file,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            tokenizer,
            bos,
            prompt_ids=prompt_ids,
            on_token=lambda token: stream[0](token),
            tokenizer_ready=lambda tok: stream.append(Stream(tok)),
        )
    except KeyboardInterrupt:
        made = stream[0].tokens if stream else []
        if stream:
            stream[0].close()
        if out_ids is not None and made:
            np.save(out_ids, np.asarray(made, np.int32))
        kept = f"; the {len(made)} new tokens so far" + (f" are in {out_ids}" if out_ids else "")
        raise Interrupted("interrupted" + (kept if made else "")) from None
    stream[0].close()
    if out_ids is not None:
        np.save(out_ids, np.asarray(out.tokens, np.int32))
    per_token = (
        f"then {1000 * out.seconds_per_token:.1f} ms/token"
        if math.isfinite(out.seconds_per_token)
        else "too few tokens to time the rest"
    )
    typer.echo(
        f"{len(out.tokens)} new tokens after a prompt of {len(prompt)}; first token after "
        f"{out.first_token_seconds:.2f} s (prompt read and compiles), {per_token}"
        + (f"; ids in {out_ids}" if out_ids else ""),
        err=True,
    )
