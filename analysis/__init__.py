"""Polars loaders over tracked runs and Matplotlib recipes for the paper's figures."""

from analysis.figures import FIGURES, Figure, build_all, draw
from analysis.loaders import metric_history, runs, token_nll
from analysis.recipes import Data

__all__ = ["Data", "FIGURES", "Figure", "build_all", "draw", "metric_history", "runs", "token_nll"]
