"""The `fcd` command line, grouped by stage. Heavy libraries are imported inside the commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

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


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def quickstart_overrides(*, full: bool, eval_per_category: int | None, train_examples: int | None,
                         train_steps: int | None, concurrency: int | None, augment_multiplier: int | None,
                         epochs: float | None, seed: int | None, engine: str | None) -> list[str]:
    """`fcd quickstart`'s flags as `--set` overrides of its recipe; a flag not given leaves the recipe's value."""
    if engine not in (None, "hf", "vllm"):
        fail(f"unknown --engine {engine!r}; choose hf or vllm")
    given = [v for v in (eval_per_category, train_examples, train_steps, concurrency, epochs) if v is not None]
    if any(v <= 0 for v in given):
        fail("--eval-per-category, --train-examples, --train-steps, --concurrency and --epochs must be positive")
    if augment_multiplier is not None and not 0 <= augment_multiplier <= 20:
        fail(f"--augment-multiplier must be between 0 and 20, got {augment_multiplier}")
    if full and (train_examples is not None or train_steps is not None):
        fail("--train-examples and --train-steps size the default run; --full trains on everything for --epochs")
    if not full and epochs is not None:
        fail("--epochs applies to --full; the default run trains --train-steps steps")
    sets = [f"eval.limit_per_category={eval_per_category}"] if eval_per_category is not None else []
    if train_examples is not None:
        sets.append(f"train.sample.examples={train_examples}")
    if train_steps is not None:
        sets += [f"train.set.max_steps={train_steps}", f"train.set.save_steps={max(1, train_steps // 3)}"]
    if epochs is not None:
        sets.append(f"train.set.epochs={epochs}")
    if concurrency is not None:
        sets.append(f"eval.concurrency={concurrency}")
    if augment_multiplier is not None:
        sets.append("augment=null" if augment_multiplier == 0 else f"augment.multiplier={augment_multiplier}")
    if seed is not None:
        sets.append(f"seed={seed}")
    if engine == "vllm":  # vLLM's LoRA cannot add the FC token: the tuned student is served merged
        sets += ["serve.engine=vllm", "export.merge=true"]
    return sets


@app.command("quickstart")
def quickstart(
    out: Annotated[Path, typer.Option(help="Run directory; a rerun resumes where a killed one stopped.")] = Path("runs/quickstart"),
    full: Annotated[bool, typer.Option(help="recipes/quality-cpu.yaml instead: train on the whole augmented train "
                                            "split for 3 epochs and evaluate every held-out item (hours).")] = False,
    eval_per_category: Annotated[Optional[int], typer.Option(
        help="Eval items per category [recipe: 5; --full: every held-out item].", show_default=False)] = None,
    train_examples: Annotated[Optional[int], typer.Option(help="Train examples sampled from the split [recipe: 96].",
                                                          show_default=False)] = None,
    train_steps: Annotated[Optional[int], typer.Option(help="Training steps, one packed 1024-token row each "
                                                            "[recipe: 32].", show_default=False)] = None,
    concurrency: Annotated[Optional[int], typer.Option(help="Eval requests in flight [recipe: 8].",
                                                       show_default=False)] = None,
    augment_multiplier: Annotated[Optional[int], typer.Option(
        help="Augmented records tried per train record [recipe: 2]; 0 trains on BFCL's pairs alone.",
        show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="--full: passes over the train split [recipe: 3].",
                                                    show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split and samples [recipe: 42].",
                                                show_default=False)] = None,
    engine: Annotated[Optional[str], typer.Option(help="Serving engine for the evaluation: hf (embedded) or vllm "
                                                       "(needs vLLM; on CPU scripts/setup_vllm.sh) [recipe: hf].",
                                                  show_default=False)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any other recipe field, as `fcd run --set` "
                                                      "takes it, e.g. --set eval.max_tokens=128.")] = None,
) -> None:
    """BFCL data -> LoRA-train SmolLM2-135M -> serve base + adapter -> evaluate both -> compare (CPU).
    The same as `fcd run recipes/quickstart-cpu.yaml` (--full: recipes/quality-cpu.yaml), flags as --set."""
    import yaml

    from fcdistill.recipe.model import RecipeError, load_recipe
    from fcdistill.recipe.runner import run_recipe
    from fcdistill.recipe.stages import StageFailed

    sets = quickstart_overrides(full=full, eval_per_category=eval_per_category, train_examples=train_examples,
                                train_steps=train_steps, concurrency=concurrency,
                                augment_multiplier=augment_multiplier, epochs=epochs, seed=seed, engine=engine)
    recipe = RECIPES / ("quality-cpu.yaml" if full else "quickstart-cpu.yaml")
    # the recipe names its training config from the repository root; the alias works from anywhere
    sets.append(f"train.config={RECIPES.parent / yaml.safe_load(recipe.read_text())['train']['config']}")
    sets += list(set_ or [])  # last: the user's own --set wins over the flags above
    try:
        run_recipe(load_recipe(recipe, sets), out, say=lambda m: typer.echo(m, err=True))
    except RecipeError as exc:
        fail(str(exc))
    except StageFailed as exc:
        fail(str(exc), code=1)
    except ValueError as exc:  # a stage's own bad-input error
        fail(str(exc))
    typer.echo((out / "report" / "compare.md").read_text(encoding="utf-8"))


# Every stage's commands are registered here and only here; stage modules never import this one, so
# the command line has no import cycle. Each keeps its heavy imports inside its commands.
for _register in (register_data, register_serve, register_train, register_teacher, register_eval, register_recipe):
    _register(app)



def main() -> None:
    """The `fcd` script and `python -m fcdistill`."""
    app(prog_name="fcd")


if __name__ == "__main__":
    main()
