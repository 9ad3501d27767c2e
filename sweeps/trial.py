"""One sweep trial: a Ray Tune function trainable that calls `ttt.train.run` in-process.

The trial's run directory is rebuilt from Tune's checkpoint on every (re)start, so Tune's
checkpoint is the single source of truth: a retried or resumed trial continues from it,
and one that has none starts from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sweeps.spec import SweepSpec


def _jax_env(gpu: float) -> None:
    """Before JAX starts in this worker: share a GPU safely, or keep JAX off it."""
    if 0 < gpu < 1:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.95 * gpu:.3f}"
    if gpu == 0 and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


FINAL = "final.json"


def _stage_checkpoint(run_dir: Path, step: int, final: dict | None) -> Path:
    """A self-contained copy of the run at `step`, for Tune to persist. The final one
    carries the last report, so a trial Tune restarts after it finished (its state was
    saved before the finish) reports again instead of training again."""
    stage = Path(tempfile.mkdtemp(prefix=f"ckpt-{step}-"))
    if final is not None:
        (stage / FINAL).write_text(json.dumps(final))
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, stage / name)
    if (run_dir / "eval").is_dir():
        shutil.copytree(run_dir / "eval", stage / "eval")
    shutil.copytree(run_dir / "checkpoints" / str(step), stage / "checkpoints" / str(step))
    return stage


def trial_main(config: dict, spec: SweepSpec) -> None:
    _jax_env(spec.resources.get("gpu", 0.0))
    import ray
    from ray import tune

    from ttt.train import Reporter, run

    stage = next((s for s in spec.stages if s.name == config.get("stage")), None)
    overrides = dict(config.get("sample") or {})
    if config.get("init_from"):
        overrides["train.init_from"] = config["init_from"]
    cfg = spec.config(config["point"], overrides, stage)
    node_id = ray.get_runtime_context().get_node_id()
    # Node-local scratch, outside Tune's trial folder (which Tune syncs to storage as
    # driver artifacts): Tune's checkpoints are what persists.
    ctx = tune.get_context()
    run_dir = (
        Path(tempfile.gettempdir())
        / "ttt-trials"
        / ctx.get_experiment_name()
        / ctx.get_trial_id()
        / "run"
    )
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, run_dir)

    class TuneReporter(Reporter):
        def metrics(self, step, values):
            tune.report({**values, "step": step, "node_id": node_id})

        def checkpoint(self, step, directory, values, final=False):
            result = {**values, "step": step, "node_id": node_id}
            if final:
                result["outcome"] = "finished"
            stage_dir = _stage_checkpoint(run_dir, step, result if final else None)
            try:
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(stage_dir))
            finally:
                shutil.rmtree(stage_dir, ignore_errors=True)

    try:
        if (run_dir / FINAL).exists():
            tune.report(json.loads((run_dir / FINAL).read_text()))
            return
        result = run(cfg, run_dir, reporter=TuneReporter(), progress=False)
        if result.status == "diverged":
            tune.report(
                {
                    "outcome": "diverged",
                    "step": result.step,
                    "message": result.message,
                    "node_id": node_id,
                }
            )
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
