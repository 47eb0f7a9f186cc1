"""The `fcd` command line, grouped by stage. Heavy libraries are imported inside the commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

if os.environ.get("FCD_KILL_WITH_PARENT"):
    from fcdistill.serve.engines.vllm_env import in_served_child, prepare_child

    if in_served_child():
        # a vLLM process spawned by `fcd serve`, which imports this module again as the parent's main
        # module before the child's work (vLLM) is loaded: it dies with its parent, and starts quietly
        prepare_child()

from fcdistill.data.cli import register as register_data
from fcdistill.errors import fail
from fcdistill.eval.cli import register as register_eval
from fcdistill.recipe.cli import register as register_recipe
from fcdistill.serve.cli import register as register_serve
from fcdistill.teacher.cli import register as register_teacher
from fcdistill.train.cli import register as register_train

# Rich help in a terminal; plain help otherwise: rich cuts long defaults ("simple_python,multipl…") to
# its 80-column fallback width when stdout is a pipe or a file, where click's formatter, 120 columns
# wide, shows them whole. Sub-apps (data, eval) inherit both settings.
_TTY = sys.stdout.isatty()
app = typer.Typer(help="fcdistill: distill function calling into a small local model.",
                  rich_markup_mode="rich" if _TTY else None, context_settings={} if _TTY else {"terminal_width": 120},
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Run directory; a rerun resumes where a killed one stopped.")] = Path("runs/quickstart"),
    full: Annotated[bool, typer.Option(help="Train on the whole train split and evaluate every held-out item.")] = False,
    eval_per_category: Annotated[int | None, typer.Option(
        help="Eval items per category (default run: 5; --full: every held-out item).")] = None,
    train_examples: Annotated[int, typer.Option(help="Train examples sampled from the split (default run).")] = 96,
    train_steps: Annotated[int, typer.Option(help="Training steps, one packed 1024-token row each (default run).")] = 32,
    concurrency: Annotated[int, typer.Option(help="Eval requests in flight (the server batches them).")] = 8,
    augment_multiplier: Annotated[int, typer.Option(
        help="Augmented records tried per train record (fcd data augment); 0 trains on BFCL's pairs alone.")] = 2,
    epochs: Annotated[float, typer.Option(help="--full: passes over the augmented train split.")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of the split and samples.")] = 42,
    engine: Annotated[str, typer.Option(help="Serving engine for the evaluation: hf (embedded) or vllm "
                                             "(needs vLLM; on CPU scripts/setup_vllm.sh).")] = "hf",
) -> None:
    """BFCL data -> LoRA-train SmolLM2-135M -> serve base + adapter -> evaluate both -> compare (CPU)."""
    from fcdistill.pipeline import QuickstartError, QuickstartOptions, run_quickstart

    if engine not in ("hf", "vllm"):
        fail(f"unknown --engine {engine!r}; choose hf or vllm")
    if min(1 if eval_per_category is None else eval_per_category, train_examples, train_steps, concurrency, epochs) <= 0:
        fail("--eval-per-category, --train-examples, --train-steps, --concurrency and --epochs must be positive")
    if not 0 <= augment_multiplier <= 20:
        fail(f"--augment-multiplier must be between 0 and 20, got {augment_multiplier}")
    try:
        table = run_quickstart(QuickstartOptions(out=out, full=full, eval_per_category=eval_per_category,
                                                 train_examples=train_examples, train_steps=train_steps, seed=seed,
                                                 concurrency=concurrency, engine=engine,
                                                 augment_multiplier=augment_multiplier, epochs=epochs),
                               say=lambda m: typer.echo(m, err=True))
    except QuickstartError as exc:
        fail(str(exc))
    typer.echo(table)


# Every stage's commands are registered here and only here; stage modules never import this one, so
# the command line has no import cycle. Each keeps its heavy imports inside its commands.
for _register in (register_data, register_serve, register_train, register_teacher, register_eval, register_recipe):
    _register(app)



def main() -> None:
    """The `fcd` script and `python -m fcdistill`."""
    app(prog_name="fcd")


if __name__ == "__main__":
    main()
