"""The needle-in-a-haystack harness, checked without a trained model: prompt length and
needle position, the haystacks, the scoring, and one run end to end on pico."""

import numpy as np
import polars as pl
import pytest
from flax import nnx

from ttt.data.tokenizer import byte_tokenizer
from ttt.errors import UserError
from ttt.niah import TASKS, make_sample, score

TOK = byte_tokenizer()
ESSAY = np.asarray(TOK.encode("Lorem ipsum dolor sit amet. " * 200) + [TOK.bos_id] * 3)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_length_and_needle_position(task, depth):
    s = make_sample(task, 1024, depth, 0, TOK, ESSAY)
    assert len(s.prompt) == 1024 and s.prompt[0] == TOK.bos_id
    text = TOK.decode(s.prompt)
    needle = f" One of the special magic {'uuids' if task == 'niah3' else 'numbers'} for "
    needle += f"{s.key} is: {s.value}. "
    assert text.count(needle) == 1
    assert TOK.decode(s.prompt[s.needle_at : s.needle_at + len(needle)]) == needle
    # bytes: one token per character, and the BOS (no character) comes first
    head = text.index("afterwards.\n") + len("afterwards.\n")
    tail = text.index("\nWhat is the special magic")
    hay_len = tail - head - len(needle)
    assert s.needle_at - 1 - head == round(depth * hay_len)
    assert text.endswith("mentioned in the provided text is")
    assert TOK.bos_id not in s.prompt[1:]  # documents in the haystack do not restart


def test_haystacks_and_values():
    one = make_sample("niah1", 1024, 0.5, 0, TOK, None)
    assert "The grass is green." in TOK.decode(one.prompt)
    two = make_sample("niah2", 1024, 0.5, 0, TOK, ESSAY)
    assert "Lorem ipsum" in TOK.decode(two.prompt) and two.value.isdigit()
    assert len(two.value) == 7
    three = make_sample("niah3", 1024, 0.5, 0, TOK, ESSAY)
    assert len(three.value) == 36 and three.value.count("-") == 4
    # seeded: the same sample twice, another index another value
    assert make_sample("niah2", 1024, 0.5, 0, TOK, ESSAY) == two
    assert make_sample("niah2", 1024, 0.5, 1, TOK, ESSAY).value != two.value
    with pytest.raises(UserError, match="too short for niah1"):
        make_sample("niah1", 200, 0.5, 0, TOK, None)
    with pytest.raises(UserError, match="needs .* tokens of validation text"):
        make_sample("niah2", 1024, 0.5, 0, TOK, ESSAY[:100])


def test_scoring_is_string_match():
    assert score("1234567", " 1234567.")
    assert not score("1234567", " 123456")
    assert score("ab-cd", "the uuid is ab-cd and")


def _pico_run(tmp_path, corpus):
    from ttt.config import load_config
    from ttt.model import create_model, reference
    from ttt.train.importer import import_reference, write_reference_checkpoint

    cfg = load_config("pico", ["model.ttt_layers=2"])
    _, state = nnx.split(create_model(cfg.model))
    write_reference_checkpoint(tmp_path / "ref", 1, reference.from_ours(state.to_pure_dict()))
    run = tmp_path / "pico"
    import_reference(str(tmp_path / "ref"), run, None, [f"data.source={corpus}"], bos_id=256)
    return run


def test_harness_scores_an_oracle(tmp_path, corpus, monkeypatch):
    """With a stand-in decoder that writes the needle's value, every prompt scores."""
    import ttt.model.decode as decode

    seen = []

    def oracle(decoder, params, prompt, max_new, **kw):
        text = TOK.decode(prompt)
        value = text.split(" is: ")[1].split(". ")[0]
        seen.append(len(prompt))
        return decode.Generation(TOK.encode(f" {value}."), np.zeros(0), 0.0)

    import ttt.niah

    monkeypatch.setattr(ttt.niah, "generate", oracle)  # where the harness calls it
    from ttt.evaluation import NiahOptions, Request, evaluate

    options = NiahOptions(tuple(TASKS), (0.0, 1.0), 2)
    (m,) = evaluate(_pico_run(tmp_path, corpus), Request("niah", (512,), niah=options))
    frame = pl.read_parquet(m.tables[0])
    assert frame["correct"].all() and len(frame) == 12 and set(seen) == {512}
    assert m.table["accuracy"].to_list() == [1.0, 1.0, 1.0]


def test_niah_end_to_end_on_pico(tmp_path, corpus, capsys):
    import polars as pl

    from analysis.figures import build_all
    from ttt.cli import main

    run = _pico_run(tmp_path, corpus)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["eval", str(run), "--task", "niah", "--seq-len", "512", "--seq-len", "640"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--depths", "0.5", "--niah-tasks", "niah1,niah3", "--samples", "1",
              "--tracking-uri", uri])  # fmt: skip
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "niah3 T=640: accuracy" in out
    frame = pl.read_parquet(run / "eval" / "niah.parquet")
    assert len(frame) == 4 and frame["output"].dtype == pl.String
    written, _ = build_all(uri, tmp_path / "figs", only=["table2_niah"])
    table = pl.read_parquet(written["table2_niah"][-1])
    assert sorted(table["niah.task"].unique()) == ["niah1", "niah3"]
    assert sorted(table["data.seq_len"].unique()) == [512, 640]
    assert (run / "eval" / "niah.png").is_file()
    # Results accumulate: another cell adds a row, the same cells again replace theirs.
    more = ["--depths", "0", "--niah-tasks", "niah1", "--samples", "1"]
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(run), "--task", "niah", "--seq-len", "512", *more])
    assert exc.value.code == 0, capsys.readouterr().err
    again = pl.read_parquet(run / "eval" / "niah.parquet")
    assert len(again) == 5 and again.join(frame, on=list(frame.columns)).height == 4
    for bad, message in [
        (["--task", "niah", "--seq-len", "512", "--depths", ""], "--depths: no depth given"),
        (["--task", "niah", "--seq-len", "512", "--niah-tasks", ""], "--niah-tasks: no task"),
        (["--task", "niah", "--seq-len=-5"], "--seq-len=-5: must be >= 1"),
        (["--task", "niah", "--seq-len", "512", "--tokens", "x.npy"], "--tokens: only with"),
        (["--task", "nia"], "--task='nia': allowed are loss, niah"),
        (["--task", "niah"], "give the context lengths with --seq-len"),
        (["--task", "niah", "--seq-len", "512", "--depths", "2"], "--depths: 2.0 is not"),
        (["--task", "niah", "--seq-len", "512", "--niah-tasks", "x"], "'x' is not a task"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(run), *bad])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert pl.read_parquet(run / "eval" / "niah.parquet").equals(again)  # none wrote
