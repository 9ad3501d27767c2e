"""`ttt report` (analysis/claims.py, analysis/report.py): each verdict rule on synthetic
stores whose losses are known, and the command as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.recipes import Data
from analysis.report import verdicts
from analysis.synthetic import FakeRun, trial_params, write_store
from ttt import tags as TAG
from ttt.cli import main
from ttt.data.floors import Floors, as_tag

CLAIM = "fig1.ttt_at_or_below_full"
# A corpus whose trigram floor is 1.75: a loss under it has learned local statistics.
FLOORS = {"stdlib": Floors("fp", {1: 3.3, 2: 2.4, 3: 1.75, 4: 1.37}, 10, 10, 258)}


def store(tmp_path, losses: dict, se=0.002, floors=FLOORS, seq_lens=(256,), **overrides):
    """Two seeds of full attention and TTT-E2E per length, each with the given final
    loss (`losses[(method, seed)]`, plus 0.01 per doubling of T) and standard error."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = []
    for (mixer, seed), loss in losses.items():
        for t in seq_lens:
            params = trial_params(mixer, train__seed=seed, data__seq_len=t, **overrides)
            final = {"final_eval_loss": loss - 0.01 * np.log2(t / 256), "eval_loss_se": se,
                     "context_use": 0.3, "context_use_se": 0.01}  # fmt: skip
            runs.append(FakeRun("study", params, final))
    write_store(uri, runs, {TAG.FLOORS: as_tag(floors)} if floors else None)
    return uri


def verdict_of(uri, claim=CLAIM):
    (v,) = [v for v in verdicts(Data(uri)) if v.claim == claim]
    return v


def test_a_clear_win_is_supported_and_changing_one_run_flips_it(tmp_path):
    win = {("full", 0): 1.60, ("full", 1): 1.62, ("ttt_e2e", 0): 1.50, ("ttt_e2e", 1): 1.51}
    v = verdict_of(store(tmp_path / "a", win))
    assert v.verdict == "supported", v.reason
    assert v.points[0]["pairs"] == 2 and v.points[0]["hi"] < 0
    assert all(r["run_name"] for r in v.runs) and len(v.runs) == 4
    # one run of TTT-E2E worse than its twin: the pairs no longer agree on the sign
    flipped = {**win, ("ttt_e2e", 1): 1.64}
    assert verdict_of(store(tmp_path / "b", flipped)).verdict == "inconclusive"


def test_a_clear_loss_is_contradicted(tmp_path):
    loss = {("full", 0): 1.50, ("full", 1): 1.52, ("ttt_e2e", 0): 1.60, ("ttt_e2e", 1): 1.61}
    v = verdict_of(store(tmp_path, loss))
    assert v.verdict == "contradicted" and "T=256" in v.reason


def test_a_difference_inside_the_evaluations_noise_is_inconclusive(tmp_path):
    """The same 0.01 gap at both seeds is an effect with exact evaluations, and inside
    the noise when each evaluation's standard error is 0.05."""
    small = {("full", 0): 1.60, ("full", 1): 1.62, ("ttt_e2e", 0): 1.59, ("ttt_e2e", 1): 1.61}
    assert verdict_of(store(tmp_path / "a", small, se=0.0)).verdict == "supported"
    v = verdict_of(store(tmp_path / "b", small, se=0.05))
    assert v.verdict == "inconclusive" and "interval holds zero" in v.reason


def test_runs_above_the_trigram_floor_are_not_evidence(tmp_path):
    high = {("full", 0): 2.60, ("full", 1): 2.62, ("ttt_e2e", 0): 2.50, ("ttt_e2e", 1): 2.51}
    v = verdict_of(store(tmp_path, high))
    assert v.verdict == "not evidence" and "trigram floor" in v.reason
    # the same runs without floors in the store are read as they are
    assert verdict_of(store(tmp_path / "n", high, floors=None)).verdict == "supported"


def test_runs_on_the_recall_task_are_not_evidence_for_a_language_model_claim(tmp_path):
    """A recall store's losses (filler and keys scored with the values) are not Fig 1's."""
    win = {("full", 0): 1.60, ("full", 1): 1.62, ("ttt_e2e", 0): 1.50, ("ttt_e2e", 1): 1.51}
    v = verdict_of(store(tmp_path, win, seq_lens=(64,), data__source="recall"))
    assert v.verdict == "not evidence" and "recall task" in v.reason, v.reason


def test_a_claim_with_no_runs_names_what_would_produce_them(tmp_path):
    uri = store(tmp_path, {("full", 0): 1.6, ("ttt_e2e", 0): 1.5})
    v = verdict_of(uri, "table1.ladder_beats_swa")
    assert v.verdict == "no runs" and "ladder" in v.reason
    one = verdict_of(uri)  # one seed: a difference, but no interval to read it by
    assert one.verdict == "inconclusive" and "one seed" in one.reason


def test_report_command_writes_the_page_and_its_mistakes_are_one_line(tmp_path, capsys):
    win = {("full", 0): 1.60, ("full", 1): 1.62, ("ttt_e2e", 0): 1.50, ("ttt_e2e", 1): 1.51}
    uri = store(tmp_path, win, seq_lens=(256, 1024))
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        main(["report", "-e", "study", "--out", str(out), "--tracking-uri", uri])
    assert exc.value.code == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert f"supported  {CLAIM}" in said and "report:" in said
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "#/experiments/" in page
    first = json.loads((out / "verdicts.json").read_text())["verdicts"]
    with pytest.raises(SystemExit):  # the same store twice: the same verdicts
        main(["report", "-e", "study", "--out", str(tmp_path / "again"), "--tracking-uri",
              uri, "--no-log"])  # fmt: skip
    capsys.readouterr()
    again = json.loads((tmp_path / "again" / "verdicts.json").read_text())["verdicts"]
    assert [(v["claim"], v["verdict"]) for v in first] == [
        (v["claim"], v["verdict"]) for v in again
    ]
    from ttt.tracking import client

    c = client(uri)
    parent = c.search_runs([c.get_experiment_by_name("study").experiment_id],
                           f"tags.`{TAG.ROLE}` = 'sweep'")[0]  # fmt: skip
    logged = [a.path for a in c.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.html" in logged
    (tmp_path / "file").write_text("x")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    client(empty).search_experiments()  # a store with its tables and no run
    capsys.readouterr()  # MLflow's lines about making those tables
    for argv, needle in (
        (["report", "-e", "nope", "--tracking-uri", uri], "--experiment='nope': no such"),
        (["report", "--tracking-uri", empty, "--out", str(tmp_path / "e")], "holds no trial runs"),
        (["report", "--out", str(tmp_path / "file"), "--tracking-uri", uri], "is a file"),
        (["report", "--bogus"], "No such option"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.slow
def test_the_page_renders_its_figures_and_its_links_open_the_runs(tmp_path):
    """The report as a user opens it: in a fresh headless Chromium, every embedded figure
    decodes, and a run's link opens that run in the MLflow UI (`ttt ui`)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import headless_browser, serves, wait_until
    from selenium.webdriver.common.by import By

    win = {("full", 0): 1.60, ("full", 1): 1.62, ("ttt_e2e", 0): 1.50, ("ttt_e2e", 1): 1.51}
    uri = store(tmp_path, win, seq_lens=(256, 1024))
    with pytest.raises(SystemExit):
        main(["report", "--out", str(tmp_path / "rep"), "--tracking-uri", uri, "--no-log"])
    driver = headless_browser()
    port = 5300 + os.getpid() % 500
    ui = subprocess.Popen([sys.executable, "-m", "ttt.cli", "ui", "--tracking-uri", uri,
                           "--port", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    shots = Path(__file__).parent.parent / "build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    try:
        driver.get((tmp_path / "rep" / "report.html").as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in images
        )
        assert (
            "fig1.ttt_at_or_below_full: supported" in driver.find_element(By.TAG_NAME, "body").text
        )
        driver.save_screenshot(str(shots / "report.png"))
        link = driver.find_elements(By.CSS_SELECTOR, "a.run")[0]
        name, href = link.text, link.get_attribute("href")

        wait_until(lambda: serves(f"http://127.0.0.1:{port}"), "ttt ui", timeout=120)
        driver.get(href.replace("127.0.0.1:5000", f"127.0.0.1:{port}"))
        wait_until(lambda: name in driver.find_element(By.TAG_NAME, "body").text,
                   f"the run page of {name}", timeout=90)  # fmt: skip
        driver.save_screenshot(str(shots / "report-run-link.png"))
    finally:
        driver.quit()
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
