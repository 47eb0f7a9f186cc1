"""`fcd train` and `fcd export` (filled in by the training stage)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level CLI."""
