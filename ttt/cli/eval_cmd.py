"""`ttt eval`: flags into an evaluation request (`ttt.evaluation`), and its lines."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from ttt.cli import options
from ttt.errors import UserError

# deferred imports: a command imports what it runs inside its own function, so that
# `ttt --help` and the light commands load neither JAX, Ray nor MLflow.


def evaluate(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN", help="A run directory written by `ttt train` or `ttt import`."
    ),
    seq_len: list[int] = typer.Option(
        None, "--seq-len", help="Evaluate at this context length (repeat for several)."
    ),
    max_batches: int = typer.Option(
        None, "--max-batches", help="Cap on validation batches (0: the whole held-out split)."
    ),
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
    tracking_uri: str = options.tracking_uri(
        "Log each measurement to MLflow here", "or set MLFLOW_TRACKING_URI; untracked otherwise"
    ),
    experiment: str = options.experiment("evals"),
    task: str = typer.Option(
        "loss",
        "--task",
        help="loss; niah (needle in a haystack); recall (the recall task's accuracy by "
        "distance, `ttt.data.recall`).",
    ),
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
    """Evaluate with test-time training: mean loss and per-token NLL by position (Parquet,
    with standard errors and context use), needle-in-a-haystack accuracy (--task niah) or
    recall accuracy by distance (--task recall)."""
    from analysis.run_figures import render_measurement
    from ttt.evaluation import NiahOptions, Request, Sinks, service
    from ttt.tracking import optional_uri
    from ttt.tracking.records import EvalTracker

    try:
        fractions = tuple(float(d) for d in depths.split(",") if d.strip())
    except ValueError:
        raise UserError(f"--depths={depths!r}: expected comma-separated fractions") from None
    niah = NiahOptions(
        tuple(t.strip() for t in niah_tasks.split(",") if t.strip()), fractions, samples, tokenizer
    )
    request = Request(task, tuple(seq_len or ()), max_batches, batch_size, no_inner, telemetry,
                      tokens, out, niah)  # fmt: skip
    request.check()  # before a tracking server is asked anything
    uri = optional_uri(tracking_uri)
    sinks = Sinks(render_measurement, EvalTracker(uri, experiment) if uri else None)
    previous = {}
    for m in service.evaluate(run_dir, request, sinks):
        for line in describe(m, previous):
            typer.echo(line)
        previous[(m.kind, m.seq_len)] = m


def _pm(value, se) -> str:
    return f"{value:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")


def describe(m, previous: dict) -> list[str]:
    """The lines a measurement prints (`previous`: earlier ones, by kind and length)."""
    s, where = m.summary, ", ".join(str(p) for p in m.tables[:1])
    figures = f"; figure {', '.join(map(str, m.figures))}" if m.figures else ""
    if m.kind == "tokens":
        return [
            f"loss {s['loss']:.6f} (token mean {s['token_loss']:.6f}) over {s['sequences']} "
            f"sequence(s) of {s['seq_len']} tokens; per-token NLL in {where}"
        ]
    if m.kind == "telemetry":
        return [
            f"inner steps: {s['inner_gain_own']:+.4f} nats on their own chunk, "
            f"{s['inner_gain_next']:+.4f} on the next (mean over chunks); {where}{figures}"
        ]
    if m.kind == "niah":
        lines = [
            f"{r['task']} T={r['seq_len']}: accuracy {r['accuracy']:.2f} ({r['samples']} prompts)"
            for r in m.table.iter_rows(named=True)
        ]
        heatmap = f"; heatmap {m.figures[0]}" if m.figures else ""
        return [*lines, f"every prompt's output in {where} ({s['rows']} rows){heatmap}"]
    skipped = ", test-time updates skipped" if m.kind == "noinner" else ""
    lines = [
        f"eval loss {_pm(s['loss'], s.get('eval_loss_se'))} over {s['sequences']} sequences "
        f"of {s['seq_len']} tokens{skipped}; per-position NLL in {where}"
    ]
    if "context_use" in s:
        lines.append(
            f"  context use {_pm(s['context_use'], s.get('context_use_se'))} nats (NLL at "
            "(window/2, window] minus at (T/2, T]; 0: no use of context beyond the window)"
        )
    if m.table is not None:  # the recall task's accuracy by distance
        for r in m.table.iter_rows(named=True):
            lines.append(
                f"  recall at distance {r['distance_lo']}-{r['distance_hi']}: accuracy "
                f"{_pm(r['accuracy'], r['accuracy_se'])} over {r['queries']} queries, answer "
                f"NLL {r['nll']:.4f}"
            )
    if m.without_inner is not None:
        off = previous[("noinner", m.seq_len)].summary["loss"]
        lines.append(
            f"test-time updates: loss {off:.4f} without, {s['loss']:.4f} with "
            f"({off - s['loss']:+.4f} nats bought){figures}"
        )
    elif figures:
        lines.append(figures.removeprefix("; "))
    return lines
