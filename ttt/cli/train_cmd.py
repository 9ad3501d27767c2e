"""`ttt train`, `ttt eval`."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ttt.cli.config_cmd import split_source
from ttt.errors import Interrupted, UserError
from ttt.tracking import optional_uri


def default_out(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset}-{cfg.model.mixer}-{stamp}"


def train(
    args: list[str] = typer.Argument(
        ...,
        metavar="CONFIG|PRESET [dotted.key=value ...]",
        help="A preset or a YAML config, then overrides.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Run directory (default runs/<preset>-<mixer>-<time>)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    coordinator: str = typer.Option(
        None, "--coordinator", help="HOST:PORT of process 0, for a multi-process run."
    ),
    num_processes: int = typer.Option(1, "--num-processes"),
    process_id: int = typer.Option(0, "--process-id"),
    tracking_uri: str = typer.Option(
        None,
        "--tracking-uri",
        help="Track the run in MLflow here (or set MLFLOW_TRACKING_URI); untracked otherwise.",
    ),
    experiment: str = typer.Option("runs", "--experiment", "-e", help="MLflow experiment."),
    system_metrics: bool = typer.Option(
        True, "--system-metrics/--no-system-metrics", help="Log CPU/memory/GPU use to MLflow."
    ),
) -> None:
    """Train a model; running again with the same --out resumes from its last checkpoint."""
    from ttt.config import load_config
    from ttt.train import run
    from ttt.train.checkpoint import read_run_info

    source, overrides = split_source(args)
    cfg = load_config(source, overrides)
    uri = optional_uri(tracking_uri)
    if coordinator:
        from ttt.train.distributed import initialize

        initialize(coordinator, num_processes, process_id)
    out = out or default_out(cfg)
    reporter = None
    if uri and process_id == 0:
        from analysis.figures import eval_figure_files
        from ttt.tracking import MlflowReporter

        reporter = MlflowReporter(
            uri, experiment, cfg, out, system_metrics=system_metrics, render=eval_figure_files
        )
    try:
        result = run(cfg, out, reporter=reporter, progress=not quiet)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if reporter is not None:  # nothing stays RUNNING: a re-run continues this MLflow run
            reporter.close("interrupted" if interrupted else "error", str(e).split("\n")[0])
        if interrupted:
            kept = read_run_info(out).get("step", 0)
            raise Interrupted(
                f"interrupted; the last checkpoint is step {kept}: the same command resumes"
                if kept
                else "interrupted before any checkpoint: the same command starts again"
            ) from None
        raise
    if reporter is not None:
        reporter.close(
            result.status if result.status != "stopped" else "interrupted",
            result.message,
            result.eval_loss,
        )
    if result.status == "interrupted":
        raise Interrupted(
            f"interrupted at step {result.step} (checkpointed); the same command resumes",
            result.signal,
        )
    if result.status == "diverged":
        typer.echo(f"{out}: {result.message}")
        return
    typer.echo(
        f"{out}: {result.status} at step {result.step}, loss {result.loss:.4f}"
        + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
    )


def evaluate(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN", help="A run directory written by `ttt train` or `ttt import`."
    ),
    seq_len: list[int] = typer.Option(
        None, "--seq-len", help="Evaluate at this context length (repeat for several)."
    ),
    max_batches: int = typer.Option(None, "--max-batches", help="Cap on validation batches."),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Sequences per batch (default the run's data.batch_size)."
    ),
    tokens: Path = typer.Option(
        None,
        "--tokens",
        help="Evaluate exactly these token ids (.npy: one sequence, or a 2-D batch).",
    ),
    out: Path = typer.Option(
        None, "--out", help="Parquet file for --tokens' per-token NLL (default RUN/eval/)."
    ),
    tracking_uri: str = typer.Option(
        None,
        "--tracking-uri",
        help="Log each length's loss and NLL to MLflow here (or set MLFLOW_TRACKING_URI).",
    ),
    experiment: str = typer.Option("evals", "--experiment", "-e", help="MLflow experiment."),
    task: str = typer.Option("loss", "--task", help="loss, or niah (needle in a haystack)."),
    niah_tasks: str = typer.Option(
        "niah1,niah2,niah3", "--niah-tasks", help="RULER single-needle tasks (--task niah)."
    ),
    depths: str = typer.Option(
        "0,0.25,0.5,0.75,1", "--depths", help="Needle depths in [0, 1] (--task niah)."
    ),
    samples: int = typer.Option(
        4, "--samples", help="Prompts per task, length and depth (--task niah)."
    ),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="tokenizer.json for --task niah (default: the dataset's)."
    ),
    telemetry: bool = typer.Option(
        False,
        "--telemetry",
        help="ttt_e2e: each inner step's losses (its chunk, the next), gradient norms and "
        "update size, by chunk and layer (eval/inner_loop_T*.parquet and .png).",
    ),
    no_inner: bool = typer.Option(
        False,
        "--no-inner",
        help="ttt_e2e: also evaluate with the test-time updates skipped (the meta-learned "
        "initial weights alone), and draw both (eval/inner_split_T*.png).",
    ),
) -> None:
    """Evaluate with test-time training: mean loss and per-token NLL by position (Parquet),
    or needle-in-a-haystack accuracy (--task niah)."""
    if task not in ("loss", "niah"):
        raise UserError(f"--task={task!r}: allowed are loss, niah")
    for flag, value in (("--no-inner", no_inner), ("--telemetry", telemetry)):
        if value and (task == "niah" or tokens is not None):
            raise UserError(f"{flag}: only with --task loss over the validation split")
    if task == "niah":
        for flag, value in (("--tokens", tokens), ("--out", out), ("--max-batches", max_batches),
                            ("--batch-size", batch_size)):  # fmt: skip
            if value is not None:
                raise UserError(f"{flag}: only with --task loss (niah builds its own prompts)")
        _niah(run_dir, seq_len, niah_tasks, depths, samples, tokenizer, tracking_uri, experiment)
        return

    from ttt.train.evaluate_run import evaluate_run, evaluate_tokens

    for flag, value in (("--max-batches", max_batches), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag}={value}: must be >= 1")
    for t in seq_len or []:
        if t < 1:
            raise UserError(f"--seq-len={t}: must be >= 1")
    if tokens is not None:
        if seq_len or max_batches is not None or batch_size is not None:
            raise UserError(
                "--tokens: fixes the sequences; drop --seq-len, --max-batches and --batch-size"
            )
        result, path = evaluate_tokens(run_dir, tokens, out)
        typer.echo(
            f"loss {result.loss:.6f} (token mean {result.token_loss:.6f}) over "
            f"{result.nll.shape[0]} sequence(s) of {result.nll.shape[1]} tokens; "
            f"per-token NLL in {path}"
        )
        return
    if out is not None:
        raise UserError("--out: only with --tokens")
    uri = optional_uri(tracking_uri)
    for t in seq_len or [None]:
        if telemetry:  # first: a run without an inner loop is refused before any work
            _telemetry(run_dir, t, max_batches, batch_size, uri, experiment)
        evaluated = []
        # without the updates first: a run that has none is refused before any work
        for inner in (False, True) if no_inner else (True,):
            result, path, summary = evaluate_run(run_dir, t, max_batches, batch_size, inner)
            typer.echo(
                f"eval loss {result.loss:.4f} over {result.sequences} sequences of "
                f"{result.seq_len} tokens{'' if inner else ', test-time updates skipped'}; "
                f"per-position NLL in {path}"
            )
            evaluated.append((result, path))
            if uri:
                from ttt.tracking import log_evaluation

                log_evaluation(uri, experiment, run_dir, summary, path)
        if no_inner:
            _inner_split(run_dir, evaluated)


def _telemetry(run_dir: Path, seq_len, max_batches, batch_size, uri, experiment) -> None:
    from analysis.figures import inner_loop_by_chunk
    from ttt.train.evaluate_run import inner_telemetry_run, telemetry_summary

    path, table = inner_telemetry_run(run_dir, seq_len, max_batches, batch_size)
    png = inner_loop_by_chunk(table, path.with_suffix(".png"), f"{run_dir}: inner loop by chunk")
    gains = telemetry_summary(table)
    typer.echo(
        f"inner steps: {gains['inner_gain_own']:+.4f} nats on their own chunk, "
        f"{gains['inner_gain_next']:+.4f} on the next (mean over chunks); {path}, {png}"
    )
    if uri:
        from ttt.tracking.records import log_telemetry

        log_telemetry(uri, experiment, run_dir, table, [path, png])


def _inner_split(run_dir: Path, evaluated: list) -> None:
    """The split of `ttt eval --no-inner`: what the test-time updates buy, in one line
    and one figure."""
    from analysis.figures import inner_split
    from ttt.rundir import RunDir

    (off, off_path), (on, on_path) = evaluated
    png = inner_split(
        on_path,
        off_path,
        RunDir(run_dir).inner_split_figure(on.seq_len),
        f"{run_dir}: T={on.seq_len}",
    )
    typer.echo(
        f"test-time updates: loss {off.loss:.4f} without, {on.loss:.4f} with "
        f"({off.loss - on.loss:+.4f} nats bought); figure {png}"
    )


def _niah(run_dir, seq_len, niah_tasks, depths, samples, tokenizer, tracking_uri, experiment):
    from ttt.niah import accuracy, run_niah

    if not seq_len:
        raise UserError("--task niah: give the context lengths with --seq-len (repeatable)")
    if samples < 1:
        raise UserError(f"--samples={samples}: must be >= 1")
    try:
        fractions = [float(d) for d in depths.split(",") if d.strip()]
    except ValueError:
        raise UserError(f"--depths={depths!r}: expected comma-separated fractions") from None
    tasks = [t.strip() for t in niah_tasks.split(",") if t.strip()]
    uri = optional_uri(tracking_uri)
    frame, path = run_niah(run_dir, tasks, list(seq_len), fractions, samples, tokenizer)
    table = accuracy(frame)
    for row in table.iter_rows(named=True):
        typer.echo(
            f"{row['task']} T={row['seq_len']}: accuracy {row['accuracy']:.2f} "
            f"({row['samples']} prompts)"
        )
    import polars as pl

    from analysis.figures import niah_heatmap

    everything = pl.read_parquet(path)  # this call's cells and every earlier one's
    png = niah_heatmap(everything, path.with_suffix(".png"), f"{run_dir}: NIAH accuracy")
    typer.echo(f"every prompt's output in {path} ({len(everything)} rows); heatmap {png}")
    if uri:
        from ttt.tracking import log_niah

        log_niah(uri, experiment, run_dir, table, path)
