"""The `ttt` command line."""

from ttt.cli.app import app, main

__all__ = ["app", "main"]
