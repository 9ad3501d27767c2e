import os
from pathlib import Path

# Tests run on the CPU of a 2-core machine; keep XLA from grabbing every thread pool.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile far more than they run: LLVM's optimisation of XLA's CPU code is about
# a third of each (pico) compile, and none of what they check. Trials, jobs and every other
# process the tests start inherit it (BENCHMARKS.md, "The test suite's time").
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import pytest  # noqa: E402

from ttt import process  # noqa: E402

process.ray_env()  # as every entry point does before Ray is imported (ttt/process.py)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Datasets and compiled programs go to a per-session folder, shared by its tests."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["TTT_CACHE"] = str(root)
    os.environ["TTT_COMPILE_CACHE"] = str(root / "xla")
    yield root


@pytest.fixture(autouse=True)
def _no_ambient_tracking(monkeypatch):
    """A developer's own MLFLOW_TRACKING_URI must not steer the tests' runs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


from ttt.config import load_config  # noqa: E402
from ttt.model.check import random_batch  # noqa: E402, F401  (the tests' batches)


@pytest.fixture
def pico():
    """A pico config small enough that second-order gradients compile in seconds."""

    def make(*overrides, mixer="ttt_e2e"):
        base = ["data.seq_len=64", "ttt.chunk=16", "model.window=24", f"model.mixer={mixer}"]
        return load_config("pico", [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small byte-level dataset prepared from part of the standard library."""
    import sysconfig
    from pathlib import Path

    from ttt.data import prepare

    out = tmp_path_factory.mktemp("data") / "email"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare(str(stdlib / "email" / "*.py"), out, progress=False)
    return out


# The pico training shapes the training tests share (also passed on command lines).
PICO_TRAIN = ["data.seq_len=64", "ttt.chunk=16", "model.window=24", "data.batch_size=4"]
# The base of the sweep tests' trials: those shapes, with one eval batch.
PICO_SWEEP = [*PICO_TRAIN, "train.eval_batches=1"]


def data_overrides(spec_path, data_dir) -> list[str]:
    """The command-line overrides that point a shipped spec's datasets (base and stages)
    at `data_dir`, as a user with the data elsewhere would type them."""
    import yaml

    text = spec_path.read_text()
    # a dataset path of the paper's, or the prose corpus (which needs Debian's python3-doc)
    over = [f"data.source={data_dir}"] if "/data/" in text or "pydocs" in text else []
    return over + [
        f"{st['name']}.data.source={data_dir}"
        for st in yaml.safe_load(text).get("stages", [])
        if "data.source" in st.get("overrides", {})
    ]


def write_sweep_spec(path, corpus, *overrides, **fields):
    """A sweep spec of PICO_SWEEP trials (plus `overrides`) on the small corpus, reporting
    every step; `fields` are the spec's other top-level keys."""
    import yaml

    base = {"config": "pico", "overrides": [*PICO_SWEEP, *overrides, f"data.source={corpus}"]}
    path.write_text(yaml.safe_dump({"base": base, "report_every": 1, **fields}))
    return path


@pytest.fixture
def train_cfg(corpus):
    """A pico training config on the small corpus; extra overrides win."""

    def make(*overrides):
        base = [
            f"data.source={corpus}",
            *PICO_TRAIN,
            "train.log_every=1",
            "train.eval_batches=2",
        ]
        return load_config("pico", [*base, *overrides])

    return make


REFERENCE_FIXTURE = Path(__file__).parent / "fixtures" / "reference-tiny-e2e"
# Not in the reference checkpoint: the reference ran with these (its README.md).
REFERENCE_KNOBS = ["model.window=64", "ttt.chunk=32", "ttt.inner_lr=1.0", "ttt.inner_clip=1.0"]


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory):
    """Random documents in the reference checkpoint's vocabulary (256, BOS 0)."""
    import numpy as np

    from ttt.data.prepare import write_tokens

    data = tmp_path_factory.mktemp("reference-data")
    tokens = np.random.default_rng(0).integers(1, 256, 4000).astype(np.uint16)
    tokens[::300] = 0
    for split in ("train", "val"):
        write_tokens(data, split, tokens, bos_id=0)
    (data / "meta.json").write_text('{"bos_id": 0, "vocab_size": 256}')
    return data


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def serves(url: str) -> bool:
    """Whether an MLflow server (`ttt tracking serve`, `ttt ui`) answers at `url`."""
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/health", timeout=2)
        return True
    except OSError:
        return False


def wait_until(check, what: str, timeout: float = 120, every: float = 1.0):
    """`check()`'s first true value, or a failure naming `what` after `timeout` s."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def headless_browser():
    """Debian's Chromium through its driver, in a fresh profile and with no calls home
    (this machine has no network); skips, saying why, where it is not installed."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "no browser: install Debian's Chromium and its driver "
            "(apt-get install chromium chromium-driver) to run the browser test"
        )
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chrome-')}",
    ):
        options.add_argument(arg)  # fmt: skip
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
