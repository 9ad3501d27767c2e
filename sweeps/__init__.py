"""Sweeps: specs, the Ray Tune driver, trials, the local cluster and their MLflow records.

`ray_compat` runs first, before any module here imports Ray: it refuses an untested Ray
and sets what Ray reads at import (see the README's environment table).
"""

from sweeps import ray_compat  # noqa: F401
