"""`ttt generate RUN --prompt-file F`."""

from __future__ import annotations

from pathlib import Path

import typer

from ttt.errors import UserError


def generate(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A run directory."),
    prompt_file: Path = typer.Option(
        ..., "--prompt-file", help="Text to continue (or a .npy of token ids)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="At most this many."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass, in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="tokenizer.json (default: the run's dataset's tokenizer)."
    ),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Start the prompt with BOS."),
) -> None:
    """Continue a prompt; ttt_e2e keeps training its prime MLPs on what it reads and
    writes, one inner step per chunk, exactly as in evaluation."""
    from ttt.generate import generate_from_run

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens}: must be >= 1")
    if temperature < 0:
        raise UserError(f"--temperature={temperature}: must be >= 0")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p={top_p}: must be in (0, 1]")
    text, out, prompt = generate_from_run(
        run_dir, prompt_file, max_new_tokens, temperature, top_p, seed, tokenizer, bos
    )
    typer.echo(text)
    typer.echo(
        f"{len(out.tokens)} new tokens after a prompt of {len(prompt)}; "
        f"{1000 * out.seconds_per_token:.1f} ms/token",
        err=True,
    )
