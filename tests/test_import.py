"""`ttt import reference` and `ttt eval --tokens`: a checkpoint written by the reference
implementation reproduces the reference's own loss and per-token NLL."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import REFERENCE_FIXTURE as FIXTURE
from conftest import REFERENCE_KNOBS as RUN_KNOBS
from flax import nnx

from ttt.cli import main
from ttt.config import load_config
from ttt.model import create_model, reference
from ttt.train.importer import import_reference, read_weights, write_reference_checkpoint


def _run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err.strip()


def test_reference_checkpoint_reproduces_loss_and_nll(tmp_path, capsys):
    expected = np.load(FIXTURE / "expected.npz")
    np.save(tmp_path / "doc.npy", expected["tokens"])
    run = tmp_path / "run"
    code, out, err = _run(
        ["import", "reference", str(FIXTURE), "--out", str(run), *RUN_KNOBS, "--bos-id", "0"],
        capsys,
    )
    assert code == 0, err
    assert "imported step 7" in out and "2 TTT layers" in out
    cfg = load_config(str(run / "config.yaml"))
    m = cfg.model
    assert (m.layers, m.width, m.heads, m.mlp, m.vocab_size, m.ttt_layers) == (4, 64, 4, 96, 256, 2)
    assert (m.mixer, m.window, cfg.ttt.chunk) == ("ttt_e2e", 64, 32)

    code, out, err = _run(["eval", str(run), "--tokens", str(tmp_path / "doc.npy")], capsys)
    assert code == 0, err
    table = pl.read_parquet(run / "eval" / "tokens_doc.parquet")
    assert table.columns == ["sequence", "position", "token", "nll", "counted"]
    np.testing.assert_array_equal(table["token"].to_numpy(), expected["tokens"][1:])
    np.testing.assert_allclose(table["nll"].to_numpy(), expected["nll"], atol=2e-3, rtol=0)
    # the one target equal to the BOS (tokens[150], target 149) is not counted
    assert (~table["counted"]).sum() == 1 and not table["counted"][149]
    summary = pl.read_json(run / "eval" / "tokens_doc.json").row(0, named=True)
    assert abs(summary["loss"] - float(expected["loss"])) < 1e-5
    # the printed loss is that number (to its six decimals; the float sum's order may
    # move the last one)
    printed = float(out.split("loss ", 1)[1].split()[0])
    assert abs(printed - float(expected["loss"])) < 1e-5, out


def test_import_round_trip_is_exact_and_fine_tunes(tmp_path):
    """Our weights written in the reference's layout import back bit for bit, with the
    shapes read from the weights and the matching preset found."""
    cfg = load_config("pico", ["model.ttt_layers=2"])
    _, state = nnx.split(create_model(cfg.model, seed=3))
    ours = state.to_pure_dict()
    write_reference_checkpoint(tmp_path / "ref", 12, reference.from_ours(ours))
    got, step = import_reference(str(tmp_path / "ref"), tmp_path / "run", None, [], bos_id=256)
    assert step == 12 and got.preset == "pico" and got.model.ttt_layers == 2
    weights, _ = read_weights(str(tmp_path / "ref"))
    back = reference.to_ours(weights, 2, 2)
    for (path, a), (_, b) in zip(_leaves(ours), _leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(path))


def _leaves(tree):
    import jax

    return sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: str(kv[0]))


def _reference_with(tmp_path, edit) -> Path:
    cfg = load_config("pico", ["model.ttt_layers=2"])
    _, state = nnx.split(create_model(cfg.model))
    weights = reference.from_ours(state.to_pure_dict())
    edit(weights)
    return write_reference_checkpoint(tmp_path / "ref", 1, weights)


@pytest.mark.parametrize(
    "edit, args, message",
    [
        (lambda w: None, ["125m"], "model.vocab_size=128256 (preset 125m): the checkpoint's"),
        (lambda w: None, ["model.layers=6"], "model.layers=6 (override): the checkpoint's weights"),
        (lambda w: None, ["model.mixer=swa"], "model.mixer='swa' (override)"),
        (lambda w: None, ["--step", "3"], "--step=3: not in"),
        (lambda w: None, ["--bos-id", "999"], "--bos-id=999: must be a token id below"),
        (
            lambda w: w["language_model"].update(lm_head={"weight": np.zeros((64, 258))}),
            [],
            "weights this model has no place for: language_model.lm_head.weight",
        ),
        (
            lambda w: w["language_model"]["model"].pop("ln_f"),
            [],
            "weight language_model.model.ln_f.weight is missing",
        ),
        (
            lambda w: w["language_model"]["model"]["h"].pop("prime_storage"),
            [],
            "the checkpoint has no prime MLPs",
        ),
    ],
    ids=["preset", "override", "mixer", "step", "bos", "unknown", "missing", "no-prime"],
)
def test_import_errors_are_one_line(tmp_path, capsys, edit, args, message):
    ckpt = _reference_with(tmp_path, edit)
    code, _, err = _run(
        ["import", "reference", str(ckpt), "--out", str(tmp_path / "r"), *args], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_imported_run_is_not_resumed_and_checks_bos(tmp_path, capsys, corpus):
    ckpt = _reference_with(tmp_path, lambda w: None)
    run = tmp_path / "run"
    args = ["import", "reference", str(ckpt), f"data.source={corpus}", "--out", str(run)]
    assert _run([*args, "--bos-id", "0"], capsys)[0] == 0
    code, _, err = _run(["eval", str(run)], capsys)
    assert code == 2 and "its BOS id is 256, the run's is 0" in err, err
    code, _, err = _run(["train", str(run / "config.yaml"), "--out", str(run)], capsys)
    assert code == 2 and "holds an imported checkpoint" in err, err
    code, _, err = _run(
        ["train", str(run / "config.yaml"), f"train.init_from={run}", "--out", str(tmp_path / "f")],
        capsys,
    )
    assert code == 2 and "its BOS id is 0, the dataset" in err, err


def test_eval_tokens_errors(tmp_path, capsys):
    run = tmp_path / "run"
    import_reference(str(FIXTURE), run, None, RUN_KNOBS, bos_id=0)
    cases = {
        "bad.npy": (np.arange(65, dtype=np.int32) + 250, "outside the model's vocabulary 0..255"),
        "odd.npy": (np.arange(41, dtype=np.int32), "--tokens (40 targets): data.seq_len=40"),
        "float.npy": (np.zeros(65, np.float32), "dtype float32; token ids are integers"),
        "short.npy": (np.zeros(1, np.int32), "expected (T+1,) or (B, T+1)"),
    }
    for name, (tokens, message) in cases.items():
        np.save(tmp_path / name, tokens)
        code, _, err = _run(["eval", str(run), "--tokens", str(tmp_path / name)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (name, err)
    code, _, err = _run(["eval", str(run), "--tokens", str(tmp_path / "nope.npy")], capsys)
    assert code == 2 and "not a readable .npy/.npz array" in err, err


def test_evaluations_are_tracked_and_drawn_by_context(tmp_path, capsys, reference_data):
    """`ttt eval RUN --seq-len ... --tracking-uri` logs one MLflow run per length, a second
    evaluation of the same length updates it, and the figure draws one line per run."""
    from analysis.figures import FIGURES
    from analysis.recipes import Data

    data = reference_data
    run = tmp_path / "imported"
    import_reference(str(FIXTURE), run, None, [*RUN_KNOBS, f"data.source={data}"], bos_id=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = ["eval", str(run), "--max-batches", "1", "--batch-size", "1", "--tracking-uri", uri]
    code, out, err = _run([*base, "--seq-len", "64", "--seq-len", "128"], capsys)
    assert code == 0, err
    assert _run([*base, "--seq-len", "64"], capsys)[0] == 0
    table = FIGURES["eval_context_length"].recipe(Data(uri, ["evals"]))
    assert table["data.seq_len"].to_list() == [64, 128]
    assert table["runs"].to_list() == [1, 1] and table["model"].unique().to_list() == ["imported"]
    summary = pl.read_json(run / "eval" / "nll_by_position_T128.json").row(0, named=True)
    assert table["mean"][1] == pytest.approx(summary["loss"])
    FIGURES["eval_context_length"].draw(table)


@pytest.mark.slow
def test_import_benchmark_measures_a_fresh_process(tmp_path):
    """`ttt bench import`: the import's own peak (VmHWM of the child, not its parent's
    size carried over fork) against an interpreter that only loads the code."""
    from ttt.bench import bench_import

    r = bench_import(load_config("pico", ["model.ttt_layers=2"]), tmp_path)
    assert r["peak_rss_mb"] > r["baseline_rss_mb"] > 50
    assert r["import_mb"] == pytest.approx(r["peak_rss_mb"] - r["baseline_rss_mb"], abs=0.2)
    assert (tmp_path / "run" / "checkpoints").is_dir()
