"""Edges a user meets with the newer commands, through the installed `ttt` where it
matters (a working directory, a fresh process): runs that open from any folder, damaged
or mistyped inputs as one line, and nothing accepted silently."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PICO_TRAIN
from conftest import REFERENCE_FIXTURE as FIXTURE
from conftest import REFERENCE_KNOBS as KNOBS

from ttt.cli import main

TTT = str(Path(sys.executable).with_name("ttt"))


def ttt(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([TTT, *map(str, args)], cwd=cwd, capture_output=True, text=True)


def _cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err.strip()


def _error(args, capsys) -> tuple[int, str]:
    code, _, err = _cli(args, capsys)
    return code, err


def _one_line(code, err, needle, after_progress=False):
    assert code == 2 and "Traceback" not in err, err
    if after_progress:  # a progress bar drawn before the error
        err = err.splitlines()[-1]
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.slow
def test_a_run_made_with_relative_paths_opens_from_any_folder(tmp_path, capsys, monkeypatch):
    """Prepared, trained and named with relative paths in one folder; evaluated and used
    for generation from another, with the original tokenizer.json gone (the dataset
    keeps its own copy)."""
    import sysconfig

    from test_data import _train_bpe

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    src = Path(sysconfig.get_paths()["stdlib"]) / "email"
    vocab = _train_bpe(work / "tok.json", sorted(src.glob("*.py"))).get_vocab_size()
    monkeypatch.chdir(work)
    prepare = ["data", "prepare", "--source", f"{src}/*.py", "--out", "data"]
    assert _cli([*prepare, "--tokenizer", "tok.json"], capsys)[0] == 0
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json" and (work / "data" / "tokenizer.json").is_file()
    # Re-preparing the folder with another tokenizer would change what its ids mean.
    _one_line(*_error(prepare, capsys), "holds a dataset of another tokenizer")
    shapes = [*PICO_TRAIN, "model.mixer=swa", f"model.vocab_size={vocab}"]
    code, _, err = _cli(["train", "pico", *shapes, "data.source=data", "train.steps=2",
                         "--out", "run", "-q"], capsys)  # fmt: skip
    assert code == 0, err
    saved = (work / "run" / "config.yaml").read_text()
    assert f"source: {work / 'data'}" in saved
    (work / "tok.json").unlink()

    monkeypatch.chdir(elsewhere)
    p = ttt("eval", "../work/run", "--max-batches", "1", cwd=elsewhere)
    assert p.returncode == 0 and "eval loss" in p.stdout, p.stderr
    (elsewhere / "p.txt").write_text("def main():\n")
    p = ttt("generate", work / "run", "--prompt-file", "p.txt", "--max-new-tokens", "4",
            cwd=elsewhere)  # fmt: skip
    assert p.returncode == 0 and "new tokens after a prompt" in p.stderr, p.stderr


def test_prepare_refuses_files_without_text(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("")
    code, _, err = _cli(
        ["data", "prepare", "--source", tmp_path / "*.txt", "--out", tmp_path / "d"], capsys
    )
    _one_line(code, err, "its 3 file(s) hold no text", after_progress=True)
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_import_from_a_relative_path_says_what_it_assumed_and_generates_ids(tmp_path):
    """The most common way to type it: a relative checkpoint path. The checkpoint holds no
    window or chunk, so the import says loudly what it assumed. A BOS-0 model without a
    tokenizer of its own still generates, from ids to ids."""
    shutil.copytree(FIXTURE, tmp_path / "ref")
    p = ttt("import", "reference", "ref", "--out", "run", "--bos-id", "0", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "imported step 7" in p.stdout
    assert "assumed model.window=64 ttt.chunk=16 ttt.inner_lr=1.0" in p.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["imported_from"] == str(tmp_path / "ref")
    p = ttt("import", "reference", "ref", "--out", "run2", "--bos-id", "0", *KNOBS, cwd=tmp_path)
    assert p.returncode == 0 and "assumed" not in p.stderr, p.stderr

    tokens = np.load(FIXTURE / "expected.npz")["tokens"][:40]
    np.save(tmp_path / "prompt.npy", tokens)
    p = ttt("generate", "run2", "--prompt-ids", "prompt.npy", "--max-new-tokens", "4",
            "--out-ids", "new.npy", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    new = np.load(tmp_path / "new.npy")
    assert 1 <= len(new) <= 4 and p.stdout.split() == [str(i) for i in new]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: (c / "model_weights" / "_METADATA").unlink(), "cannot be read"),
        (lambda c: shutil.rmtree(c / "model_weights" / "d"), "d/ holds no data files"),
    ],
    ids=["no-metadata", "no-data"],
)
def test_a_damaged_checkpoint_is_one_line(tmp_path, capsys, damage, message):
    shutil.copytree(FIXTURE, tmp_path / "ref")
    damage(tmp_path / "ref" / "checkpoints" / "7")
    code, _, err = _cli(["import", "reference", tmp_path / "ref", "--out", tmp_path / "r"], capsys)
    _one_line(code, err, message)
    assert not (tmp_path / "r").exists()


def test_import_of_a_file_or_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = _cli(
        ["import", "reference", FIXTURE / "README.md", "--out", tmp_path / "r"], capsys
    )
    _one_line(code, err, "is a file; give the checkpoint directory")
    code, _, err = _cli(["import", "reference", FIXTURE, "--out", tmp_path / "f"], capsys)
    _one_line(code, err, "--out=")
    assert "is a file" in err


def test_eval_reads_the_fixtures_own_npz(tmp_path, capsys):
    from ttt.train.importer import import_reference

    import_reference(str(FIXTURE), tmp_path / "run", None, KNOBS, bos_id=0)
    code, out, err = _cli(["eval", tmp_path / "run", "--tokens", FIXTURE / "expected.npz"], capsys)
    assert code == 0, err
    loss = float(out.split("loss ", 1)[1].split()[0])
    assert abs(loss - float(np.load(FIXTURE / "expected.npz")["loss"])) < 1e-5
    np.savez(tmp_path / "two.npz", a=np.zeros(3, np.int32), b=np.zeros(3, np.int32))
    code, _, err = _cli(["eval", tmp_path / "run", "--tokens", tmp_path / "two.npz"], capsys)
    _one_line(code, err, "holds arrays a, b; expected one, or one named tokens")
    # The run's dataset is the built-in bytes (vocabulary 258): name what can move.
    code, _, err = _cli(["eval", tmp_path / "run", "--max-batches", "1"], capsys)
    _one_line(code, err, "do not fit the run's weights (vocabulary 256)")
    assert "config.yaml" in err and "--tokens" in err


def test_out_of_memory_is_one_line_with_what_would_fit(tmp_path, capsys, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED (on a GPU: a 50K-token full-attention prompt, NIAH at
    128K) is one line naming the allocation and what would fit, for the command run."""
    import jax

    import ttt.evaluation.service as service

    def exhausted(*a, **k):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.\n"
            "BufferAssignment OOM Debugging.\n..."
        )

    monkeypatch.setattr(service, "evaluate", exhausted)
    (tmp_path / "run").mkdir()
    code, _, err = _cli(["eval", tmp_path / "run", "--seq-len", "131072"], capsys)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "out of memory: Out of memory while trying to allocate 68719476736 bytes" in err
    assert "a shorter --seq-len" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["config", "show", "pico", "ttt.inner_lr=inf"], "ttt.inner_lr='inf': expected a finite"),
        (["config", "show", "pico", "train.lr=.nan"], "train.lr=nan: expected a finite number"),
        (["bench", "train", "pico", "--warmup", "-1"], "'--warmup'"),
        (["bench", "train", "pico", "--steps", "0"], "'--steps'"),
    ],
)
def test_values_that_were_accepted_silently(argv, needle, capsys):
    _one_line(*_error(argv, capsys), needle)


def test_a_window_past_the_context_is_refused_before_training(corpus, tmp_path, capsys):
    args = ["train", "pico", *PICO_TRAIN, f"data.source={corpus}", "model.window=128"]
    code, _, err = _cli([*args, "--out", tmp_path / "r"], capsys)
    _one_line(code, err, "model.window=128: larger than data.seq_len=64")
    assert not (tmp_path / "r").exists()
