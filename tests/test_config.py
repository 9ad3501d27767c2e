"""Config loading, presets, validation, and `ttt config show`."""

import dataclasses
import math

import pytest

from ttt.cli import main
from ttt.config import PRESETS, ConfigError, load_config
from ttt.model import param_counts

PAPER = ["125m", "350m", "760m", "1b", "3b"]


def closed_form_non_embedding(layers, d, heads, mlp):
    """Per block: q, k, v, o (4 d^2) + SwiGLU (3 d m) + four d-wide RMSNorms
    (pre and post for attention and MLP) + QK-norm scales (2 head_dim); + final norm d."""
    return layers * (4 * d * d + 3 * d * mlp + 4 * d + 2 * (d // heads)) + d


@pytest.mark.parametrize("preset", PAPER)
def test_paper_parameter_counts(preset):
    full = load_config(preset, ["model.mixer=full"])
    m = full.model
    counts = param_counts(m)
    assert counts["non_embedding"] == closed_form_non_embedding(m.layers, m.width, m.heads, m.mlp)
    assert counts["embedding"] == 128256 * m.width
    twin = param_counts(load_config(preset, ["model.mixer=ttt_e2e"]).model)
    assert math.isclose(twin["non_embedding"], counts["non_embedding"], rel_tol=0.02)
    assert twin["inner"] > 0 and counts["inner"] == 0


def test_ttt_e2e_uses_the_narrower_mlp_unless_overridden():
    assert load_config("760m", ["model.mixer=ttt_e2e"]).model.mlp == 3328
    assert load_config("760m", ["model.mixer=swa"]).model.mlp == 4096
    assert load_config("760m", ["model.mixer=ttt_e2e", "model.mlp=1000"]).model.mlp == 1000


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: nano\nmodel:\n  window: 32\nttt:\n  meta: false\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(str(f), ["ttt.inner_lr=0.5", "data.seq_len=128"])
    assert (cfg.preset, cfg.model.window, cfg.ttt.meta) == ("nano", 32, False)
    assert (cfg.train.lr, cfg.ttt.inner_lr, cfg.data.seq_len) == (1e-3, 0.5, 128)
    assert cfg.model.layers == PRESETS["nano"]["model"]["layers"]
    assert cfg.replace(**{"model.window": 16}).model.window == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.window = 3  # frozen


BAD = [
    (["pico", "model.foo=1"], "model.foo"),
    (["pico", "bogus.window=1"], "bogus.window"),
    (["pico", "data.seq_len=100", "ttt.chunk=16"], "data.seq_len=100"),
    (["pico", "model.ttt_layers=9"], "model.ttt_layers=9"),
    (["pico", "model.heads=5"], "model.heads=5"),
    (["pico", "train.lr=-0.1"], "train.lr=-0.1"),
    (["pico", "ttt.inner_lr=-1"], "ttt.inner_lr=-1"),
    (["huge"], "huge"),
    (["preset=huge"], "preset='huge'"),
    (["pico", "model.mixer=mamba"], "model.mixer='mamba'"),
    (["pico", "model.window=abc"], "model.window='abc'"),
    (["pico", "data.seq_len"], "data.seq_len"),
    (["pico", "model.attention=flash"], "model.attention='flash'"),
    (["pico", "ttt.cache_phases=0"], "ttt.cache_phases=0"),
    (["pico", "ttt.chunk_attention=flash"], "ttt.chunk_attention='flash'"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_configs_give_one_line_and_exit_2(args, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["config", "show", *args])
    assert exc.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert needle in lines[0]
    assert "Traceback" not in out.err + out.out


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(f))
    f.write_text("model:\n  window: 8\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        load_config(str(f))


def test_config_show_prints_counts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["config", "show", "125m", "model.mixer=full"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "mixer: full" in out and "non_embedding: 84,973,824" in out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("config", "bench"):
        assert command in out


def test_cudnn_is_checked_against_where_the_config_runs(tmp_path):
    """cuDNN needs a GPU: here (a CPU) that is a config error, but a sweep whose trials
    take GPUs validates them for the GPU, whatever machine its driver is on."""
    import yaml

    from sweeps.spec import SpecError, load_spec
    from ttt.config import ConfigError

    with pytest.raises(ConfigError, match="model.attention='cudnn': needs a GPU"):
        load_config("pico", ["model.attention=cudnn"])
    assert load_config("pico", ["model.attention=cudnn"], backend="gpu").model.attention == "cudnn"
    spec = {"name": "g", "base": {"config": "pico", "overrides": ["model.attention=cudnn"]}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**spec, "resources": {"gpu": 1}}))
    assert load_spec(path).points == [{}]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="trial 0 {}: model.attention='cudnn': needs a GPU"):
        load_spec(path)


def test_telemetry_needs_an_inner_loop():
    with pytest.raises(ConfigError, match="train.telemetry=True: needs model.mixer=ttt_e2e"):
        load_config("pico", ["model.mixer=swa", "train.telemetry=true"])
