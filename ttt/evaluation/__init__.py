"""Evaluation as a library service, below the CLI and the sweeps: `evaluate(run_dir,
request, sinks)` opens a run once (config, weights, data), makes the measurements the
request names and returns them; figures and tracking are sinks the caller passes in.

- `weights`: a run's config and weights, loaded once (`LoadedRun`);
- `measure`: each measurement of loaded weights (loss by position, telemetry, tokens);
- `service`: the request, the measurements, the sinks.
"""

from ttt.evaluation.measure import TokensResult, load_ids, read_tokens
from ttt.evaluation.service import Measurement, NiahOptions, Request, Sinks, evaluate
from ttt.evaluation.weights import LoadedRun, load_weights, open_data, run_config

__all__ = [
    "LoadedRun",
    "Measurement",
    "NiahOptions",
    "Request",
    "Sinks",
    "TokensResult",
    "evaluate",
    "load_ids",
    "load_weights",
    "open_data",
    "read_tokens",
    "run_config",
]
