"""Byte-level preparation, the reference Zarr layout, and the batch loader."""

import json

import numpy as np
import pytest
import zarr

from ttt.cli import main
from ttt.data import BOS, Loader, open_split, prepare
from ttt.data.prepare import write_tokens
from ttt.errors import UserError


def test_prepare_writes_reference_layout(corpus, tmp_path):
    meta = json.loads((corpus / "meta.json").read_text())
    arr = zarr.open_array(str(corpus / "train"), mode="r")
    assert arr.ndim == 1 and arr.metadata.zarr_format == 3
    codecs = json.dumps(arr.metadata.to_dict()["codecs"])
    assert "blosc" in codecs and "zstd" in codecs
    tokens = arr[:]
    assert tokens[0] == BOS
    assert (tokens == BOS).sum() == meta["documents"]["train"]  # one BOS per document
    assert len(tokens) == meta["tokens"]["train"] and meta["documents"]["val"] >= 1
    # Same content again: skipped, same fingerprint; --force rewrites.
    again = prepare(meta["source"], corpus, progress=False)
    assert again["fingerprint"] == meta["fingerprint"]


def test_split_is_by_document_and_deterministic(corpus, tmp_path):
    meta = json.loads((corpus / "meta.json").read_text())
    other = prepare(meta["source"], tmp_path / "copy", progress=False)
    assert other["documents"] == meta["documents"] and other["tokens"] == meta["tokens"]
    a = zarr.open_array(str(corpus / "val"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "copy" / "val"), mode="r")[:]
    np.testing.assert_array_equal(a, b)


def _llama_dataset(root, tokens):
    """The released datasets' layout: no meta.json, Llama-3 ids, BOS 128000."""
    import zarr
    from zarr.codecs import BloscCodec

    for split in ("train", "val"):
        zarr.create_array(
            store=str(root / split),
            data=np.asarray(tokens, np.uint32),
            chunks=(7,),
            compressors=[BloscCodec(cname="zstd", clevel=3)],
        )


def test_reference_layout_with_llama3_ids(tmp_path):
    bos = 128000
    tokens = [bos, 5, 6, 7, 8, bos, 9, 10, 11, 12, 13, bos, 14, 15, 16, 17, 100000]
    _llama_dataset(tmp_path, tokens)
    split = open_split(str(tmp_path), "train")
    assert split.bos_id == bos
    np.testing.assert_array_equal(split.window(0, len(tokens)), tokens)
    loader = Loader(split, seq_len=4, batch_size=2, shuffle=False)
    inputs, targets, mask = loader.batch_at(0)
    np.testing.assert_array_equal(inputs[1], tokens[4:8])
    np.testing.assert_array_equal(targets[1], tokens[5:9])
    np.testing.assert_array_equal(mask[1], [False, True, True, True])  # target BOS is masked
    assert mask[0].all()


def test_loader_shuffles_by_seed_and_resumes_exactly(corpus):
    split = open_split(str(corpus), "train")
    a = Loader(split, 32, 3, seed=1)
    batches = [next(a) for _ in range(5)]
    b = Loader(split, 32, 3, seed=1, position=9)  # after three batches
    np.testing.assert_array_equal(next(b)[0], batches[3][0])
    c = Loader(split, 32, 3, seed=2)
    assert not np.array_equal(next(c)[0], batches[0][0])
    ids = a.sample_ids(0, a.num_samples)
    assert sorted(ids) == list(range(a.num_samples))  # a permutation per epoch
    # the sample's tokens are the slice [j T, (j + 1) T + 1)
    j = int(a.sample_ids(0, 1)[0])
    np.testing.assert_array_equal(batches[0][0][0], split.window(j * 32, 32))
    np.testing.assert_array_equal(batches[0][1][0], split.window(j * 32 + 1, 32))


def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[0]


def test_bad_data_inputs(tmp_path, corpus, capsys):
    line = _cli_error(["train", "pico", f"data.source={tmp_path / 'missing'}"], capsys)
    assert "no such dataset directory" in line

    empty = tmp_path / "empty"
    write_tokens(empty, "train", np.zeros(0, np.uint16), BOS)
    write_tokens(empty, "val", np.zeros(0, np.uint16), BOS)
    assert "is empty" in _cli_error(["train", "pico", f"data.source={empty}"], capsys)

    corrupt = tmp_path / "corrupt"
    write_tokens(corrupt, "train", np.arange(100, dtype=np.uint16), BOS)
    write_tokens(corrupt, "val", np.arange(100, dtype=np.uint16), BOS)
    for chunk in (corrupt / "train" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not blosc at all")
    assert "could not be decoded" in _cli_error(["train", "pico", f"data.source={corrupt}"], capsys)
    (corrupt / "val" / "zarr.json").write_text("{broken")
    with pytest.raises(UserError, match="not a readable Zarr array"):
        open_split(str(corrupt), "val")

    line = _cli_error(
        ["train", "pico", f"data.source={corpus}", "data.seq_len=1048576", "ttt.chunk=1024"], capsys
    )
    assert "data.seq_len=1048576" in line and "tokens" in line


def test_prepare_cli_bad_source(tmp_path, capsys):
    line = _cli_error(
        ["data", "prepare", "--source", str(tmp_path / "*.nothing"), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert "matches no file" in line


def _train_bpe(path, files, vocab=320):
    """A tiny byte-level BPE trained on `files`, saved as a tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(f) for f in files], trainer)
    tok.save(str(path))
    return tok


@pytest.mark.slow
def test_bpe_dataset_trains_and_evaluates(tmp_path, capsys):
    """A tokenizer.json of the user's, end to end: prepare, train pico, evaluate."""
    import sysconfig
    from pathlib import Path

    src = Path(sysconfig.get_paths()["stdlib"]) / "email"
    files = sorted(src.glob("*.py"))
    tok = _train_bpe(tmp_path / "tokenizer.json", files)
    vocab = tok.get_vocab_size()
    data = tmp_path / "bpe"
    args = ["data", "prepare", "--source", str(src / "*.py"), "--out", str(data)]
    assert _cli_ok([*args, "--tokenizer", str(tmp_path / "tokenizer.json")], capsys)
    meta = json.loads((data / "meta.json").read_text())
    assert (meta["bos_id"], meta["vocab_size"]) == (0, vocab)
    # the train split is, in file order, BOS then exactly the tokenizer's ids of each file
    from ttt.data.prepare import is_val

    first = next(f for f in files if not is_val(f.name))
    ids = tok.encode(first.read_text(), add_special_tokens=False).ids
    train = open_split(str(data), "train")
    np.testing.assert_array_equal(train.window(0, len(ids) + 2), [0, *ids, 0])
    from ttt.data import load_tokenizer

    assert load_tokenizer(str(tmp_path / "tokenizer.json")).decode(ids) == first.read_text()
    assert zarr.open_array(str(data / "train")).dtype == np.uint16

    run = tmp_path / "run"
    shapes = ["data.seq_len=64", "data.batch_size=2", "model.window=24", "model.mixer=swa"]
    train_args = ["train", "pico", *shapes, f"data.source={data}", "train.steps=2", "-q"]
    err = _cli_error([*train_args, "--out", str(run)], capsys)
    assert f"model.vocab_size=258: the dataset {data} has a vocabulary of {vocab}" in err
    assert _cli_ok([*train_args, f"model.vocab_size={vocab}", "--out", str(run)], capsys)
    assert json.loads((run / "run.json").read_text())["bos_id"] == 0
    assert _cli_ok(["eval", str(run), "--max-batches", "1"], capsys)


def _cli_ok(args, capsys) -> bool:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    return True


def test_tokenizer_is_never_downloaded(tmp_path, capsys):
    err = _cli_error(
        ["data", "prepare", "--tokenizer", "meta-llama/Meta-Llama-3-8B", "--out", str(tmp_path)],
        capsys,
    )
    assert "no such local file; nothing is downloaded at run time" in err
    (tmp_path / "t.json").write_text("{}")
    err = _cli_error(
        ["data", "prepare", "--tokenizer", str(tmp_path / "t.json"), "--out", str(tmp_path)],
        capsys,
    )
    assert "not a tokenizers JSON file" in err


def test_prose_corpus_is_built_from_the_python_docs(tmp_path, monkeypatch, capsys):
    """`pydocs`: the Python documentation's reST sources (Debian's python3-doc), prepared
    on first use as a built-in corpus, held out by document; a machine without the
    package gets one line naming it."""
    import importlib

    from ttt.data.loader import dataset_root

    prep = importlib.import_module("ttt.data.prepare")  # the module, not its function

    if not prep.pydocs_root().is_dir():
        pytest.skip("Debian's python3-doc is not installed (.ci/run installs it)")
    root = dataset_root("pydocs", str(tmp_path))
    meta = json.loads((root / "meta.json").read_text())
    assert meta["source"] == "pydocs" and meta["documents"]["train"] > 400
    names = [str(p.relative_to(prep.pydocs_root())) for p in prep.pydocs_files()]
    held_out = [n for n in names if prep.is_val(n)]
    assert meta["documents"]["val"] == len(held_out) > 0  # a whole document is in one split
    val = open_split("pydocs", "val", str(tmp_path))
    text = bytes(val.window(1, 4000)[val.window(1, 4000) < 256].astype(np.uint8))
    assert b" the " in text  # prose
    assert dataset_root("pydocs", str(tmp_path)) == root  # prepared once

    monkeypatch.setattr(prep, "pydocs_root", lambda: tmp_path / "absent")
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--source", "pydocs", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "apt-get install python3-doc" in err
    assert len(err.strip().splitlines()) == 1
