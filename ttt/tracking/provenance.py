"""What a reader needs to trust a run later (code, JAX, devices), and the machine's use
while it ran (MLflow's own system monitors)."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ttt import tags as TAG

SYSTEM_PREFIX = "system/"  # MLflow's UI shows these in its "System metrics" tab


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        p = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def provenance() -> dict[str, str]:
    """What a reader needs to trust a run later: code, JAX, devices."""

    import jax  # deferred: JAX stays out of the light commands that track

    try:
        pkg = version("ttt-e2e")
    except PackageNotFoundError:
        pkg = "unknown"
    devices = jax.devices()
    tags = {
        TAG.VERSION: pkg,
        "jax.version": jax.__version__,
        "jax.backend": jax.default_backend(),
        "device.kind": devices[0].device_kind,
        "device.count": str(jax.device_count()),
        "jax.processes": str(jax.process_count()),
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        tags.update(
            {
                TAG.GIT_COMMIT: commit,
                TAG.GIT_DIRTY: str(bool(dirty)).lower(),
                "mlflow.source.git.commit": commit,  # the UI's "Source" column
            }
        )
    return tags


class SystemSampler:
    """MLflow's own CPU/memory (and, with NVML, GPU) monitors, read at each report: the
    CPU share is the average since the previous read, so no sampling thread is needed."""

    def __init__(self):
        from mlflow.system_metrics.metrics.cpu_monitor import (
            CPUMonitor,  # deferred: MLflow's monitors load only when a run samples
        )

        self.monitors = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import (
                GPUMonitor,  # deferred: as above (and pynvml with it)
            )

            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):
            pass  # no NVML here: CPU and memory only

    def read(self) -> dict[str, float]:
        out = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update({f"{SYSTEM_PREFIX}{k}": v for k, v in m.aggregate_metrics().items()})
            m.clear_metrics()
        return out
