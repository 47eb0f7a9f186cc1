"""`fcd run RECIPE` and `fcd runs show RUN_DIR`. The recipe runner loads inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fcdistill.errors import fail


def register(app: typer.Typer) -> None:
    """Add `run` and the `runs` group to the top-level CLI."""
    runs_app = typer.Typer(help="Look at recipe runs.", no_args_is_help=True)
    app.add_typer(runs_app, name="runs")

    @app.command("run")
    def run_cmd(
        recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
        out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/NAME, NAME from the recipe).")] = None,
        from_: Annotated[Optional[str], typer.Option("--from", help="Run this stage and every later one again.")] = None,
        until: Annotated[Optional[str], typer.Option(help="Stop after this stage.")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe field, e.g. --set "
                                                          "train.set.optim.learning_rate=2e-3 (value read as YAML).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (what runs, what is skipped, why); run nothing.")] = False,
    ) -> None:
        """Run a recipe's stages: data, label, synth, verify, augment, train, export, eval (serving), report.
        Finished stages whose inputs and options are unchanged are skipped; a killed run resumes."""
        from fcdistill.recipe.model import RecipeError, load_recipe
        from fcdistill.recipe.runner import Planner, run_recipe
        from fcdistill.recipe.stages import StageFailed

        try:
            r = load_recipe(recipe, list(set_ or []))
            run_dir = out or Path("runs") / r.name
            if dry_run:
                typer.echo(f"plan for {r.name} in {run_dir}:")
                for n, step in enumerate(Planner(r, run_dir).plan(from_, until), 1):
                    typer.echo(f"{n}. {step.stage}: {step.action} ({step.why}) - {step.describe}")
                return
            run_recipe(r, run_dir, start=from_, until=until, say=lambda m: typer.echo(m, err=True))
        except RecipeError as exc:
            fail(str(exc))
        except StageFailed as exc:
            fail(str(exc), code=1)
        except ValueError as exc:  # a stage's own bad-input error (DataError, TeacherError, EvalError, ConfigError)
            fail(str(exc))
        from fcdistill.recipe.report import show

        typer.echo(show(run_dir))

    @runs_app.command("show")
    def show_cmd(run_dir: Annotated[Path, typer.Argument(help="A directory written by `fcd run`.")]) -> None:
        """The stage table (status, time, counts) and the final comparison of a recipe run."""
        from fcdistill.recipe.model import RecipeError
        from fcdistill.recipe.report import show

        try:
            typer.echo(show(run_dir))
        except RecipeError as exc:
            fail(str(exc))
