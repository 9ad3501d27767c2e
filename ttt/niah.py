"""Needle in a haystack: RULER's single-needle tasks, as the paper reports them (Table 2).

- niah1: a number hidden in repeated filler sentences (RULER S-NIAH-1).
- niah2: a number hidden in real text, the run's own validation data (S-NIAH-2).
- niah3: a UUID hidden in real text (S-NIAH-3).

Each sample is one prompt of exactly `seq_len` tokens: BOS, RULER's instruction, the
haystack with the needle at `depth` (0: its start, 1: its end), then the question and the
start of the answer. The model continues greedily with test-time training (`ttt.model.
decode`); a sample is correct when the generated text contains the value (RULER's string
match).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ttt.data.loader import Dataset
from ttt.data.tokenizer import TextTokenizer
from ttt.errors import UserError
from ttt.generate import open_run
from ttt.model.decode import Decoder, generate
from ttt.rundir import RunDir

TASKS = ("niah1", "niah2", "niah3")
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
WORDS = ("apple", "river", "lantern", "meadow", "copper", "violet", "harbor", "falcon", "maple")


@dataclass(frozen=True)
class Sample:
    task: str
    seq_len: int
    depth: float
    index: int
    key: str
    value: str
    prompt: list[int]  # exactly seq_len tokens
    needle_at: int  # token index where the needle starts


def _texts(task: str) -> tuple[str, str, str]:
    """(instruction, needle, question) templates of RULER's single-needle tasks."""
    kind = "uuids" if task == "niah3" else "numbers"
    one = "uuid" if task == "niah3" else "number"
    instruction = (
        f"Some special magic {kind} are hidden within the following text. Make sure to "
        f"memorize it. I will quiz you about the {kind} afterwards.\n"
    )
    needle = f" One of the special magic {kind} for {{key}} is: {{value}}. "
    question = (
        f"\nWhat is the special magic {one} for {{key}} mentioned in the provided text? "
        f"The special magic {one} for {{key}} mentioned in the provided text is"
    )
    return instruction, needle, question


def _value(task: str, rng: np.random.Generator) -> str:
    if task == "niah3":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return str(rng.integers(1_000_000, 10_000_000))


def make_sample(
    task: str,
    seq_len: int,
    depth: float,
    index: int,
    tok: TextTokenizer,
    essay: np.ndarray | None,
    seed: int = 0,
) -> Sample:
    """One prompt of exactly `seq_len` tokens. `task` is one of TASKS (`run_niah` checks
    the user's); `essay`: token ids of real text (niah2/3), of which a window is the
    haystack."""
    rng = np.random.default_rng([seed, TASKS.index(task), seq_len, int(depth * 1000), index])
    key, value = str(rng.choice(WORDS)), _value(task, rng)
    instruction, needle, question = (t.format(key=key, value=value) for t in _texts(task))
    head, needle_ids, tail = tok.encode(instruction), tok.encode(needle), tok.encode(question)
    budget = seq_len - 1 - len(head) - len(needle_ids) - len(tail)
    if budget < 1:
        raise UserError(
            f"--seq-len={seq_len}: too short for {task}; the instruction, needle and question "
            f"alone take {seq_len - budget} tokens"
        )
    if task == "niah1":
        filler = tok.encode(FILLER)
        hay = np.resize(np.asarray(filler), budget)
    else:
        if essay is None or len(essay) < budget:
            have = 0 if essay is None else len(essay)
            raise UserError(
                f"--seq-len={seq_len}: {task} needs {budget:,} tokens of validation text, "
                f"the run's dataset has {have:,}"
            )
        start = int(rng.integers(0, len(essay) - budget + 1))
        hay = np.asarray(essay[start : start + budget])
        # documents in the haystack run into each other: their BOS becomes a newline
        hay = np.where(hay == tok.bos_id, tok.encode("\n")[0], hay)
    at = int(round(depth * budget))
    ids = [tok.bos_id, *head, *hay[:at].tolist(), *needle_ids, *hay[at:].tolist(), *tail]
    assert len(ids) == seq_len
    return Sample(
        task, seq_len, depth, index, key, value, [int(i) for i in ids], 1 + len(head) + at
    )


def answer_tokens(task: str) -> int:
    """New tokens to generate: enough for the value and a little more, in bytes."""
    return 48 if task == "niah3" else 16


def score(value: str, generated: str) -> bool:
    """RULER's string match: the value appears in what the model wrote."""
    return value in generated


def build_samples(
    run_dir,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples: int,
    tokenizer: str | None = None,
    seed: int = 0,
):
    """Every task x length x depth x sample's prompt for the run (its tokenizer, its
    validation text as the haystack of niah2 and niah3), each checked before any weight
    is loaded. Returns (samples, tokenizer)."""

    if not tasks:
        raise UserError(f"--niah-tasks: no task given; allowed are {', '.join(TASKS)}")
    if not depths:
        raise UserError("--depths: no depth given; expected comma-separated fractions in [0, 1]")
    for n in lengths:
        if n < 1:
            raise UserError(f"--seq-len={n}: must be >= 1")
    for task in tasks:
        if task not in TASKS:
            raise UserError(f"--niah-tasks: {task!r} is not a task; allowed are {', '.join(TASKS)}")
    for d in depths:
        if not 0 <= d <= 1:
            raise UserError(f"--depths: {d} is not a fraction in [0, 1]")
    cfg, _, tok = open_run(Path(run_dir), tokenizer)
    essay = None
    if any(t != "niah1" for t in tasks):
        essay = Dataset(cfg, first="val").split("val").tokens
    built = [
        make_sample(task, n, d, i, tok, essay, seed)
        for task in tasks
        for n in lengths
        for d in depths
        for i in range(samples)
    ]
    return built, tok


def run_samples(run_dir, run, built: list[Sample], tok):
    """Each prompt decoded greedily with the loaded weights (`run`, a `LoadedRun`);
    returns the rows (a Polars frame) and adds them to RUN/eval/niah.parquet
    (`merge_results`)."""

    longest = max(s.seq_len for s in built) + max(answer_tokens(s.task) for s in built)
    decoder = Decoder(run.cfg, run.graphdef, longest, tok.bos_id)  # one compile for them all
    rows = []
    for s in built:
        out = generate(decoder, run.params, s.prompt, answer_tokens(s.task), stop=(tok.bos_id,))
        text = tok.decode(out.tokens)
        rows.append(
            {
                "task": s.task,
                "seq_len": s.seq_len,
                "depth": s.depth,
                "sample": s.index,
                "value": s.value,
                "output": text,
                "correct": score(s.value, text),
            }
        )
    frame = pl.DataFrame(rows)
    path = RunDir(run_dir).niah_table
    merge_results(path, frame)
    return frame, path


KEY = ("task", "seq_len", "depth", "sample")


def merge_results(path, frame) -> None:
    """Add `frame`'s rows to the results file at `path`: a cell evaluated again replaces
    its old row (keyed by task, length, depth and sample), every other row stays. Written
    to a temporary file and renamed, so a run that fails leaves the old file whole."""

    if path.exists():
        old = pl.read_parquet(path)
        frame = pl.concat([old.join(frame.select(KEY), on=list(KEY), how="anti"), frame])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    frame.sort(list(KEY)).write_parquet(tmp)
    tmp.replace(path)


def accuracy(frame):
    """Accuracy per task and length (over depths and samples)."""

    return (
        frame.group_by("task", "seq_len")
        .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("samples"))
        .sort("task", "seq_len")
    )
