"""Options several commands share, defined once."""

from __future__ import annotations

import typer

STORE_DEFAULT = "default $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db"


def tracking_uri(what: str = "The MLflow store", default: str = STORE_DEFAULT):
    """`--tracking-uri`: `what` it is for, and what happens without it."""
    return typer.Option(None, "--tracking-uri", help=f"{what} ({default}).")


def experiment(default: str):
    return typer.Option(default, "--experiment", "-e", help="MLflow experiment.")
