"""`fcd label` and `fcd synth` (filled in by the teacher stage)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the teacher commands to the top-level CLI."""
