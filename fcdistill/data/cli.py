"""`fcd data bfcl|export|augment`: BFCL splits, exports in each training format, augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fcdistill.errors import fail, validation_message


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _counts(flag: str, value: str) -> dict[str, int]:
    """`live_simple=200,live_multiple=100` as a dict, refusing what is not CATEGORY=N with N > 0."""
    from fcdistill.data.bfcl import DataError

    out = {}
    for item in _csv(value):
        name, _, n = item.partition("=")
        if not n.isdigit() or int(n) <= 0:
            raise DataError(f"{flag}: expected CATEGORY=N with N > 0, got {item!r}")
        out[name] = int(n)
    return out


# SplitOptions' fields as `fcd data bfcl` spells them, so its validation errors name the flag
SPLIT_FLAGS = {"categories": "--categories", "eval_only": "--eval-only", "live_eval_only": "--live-eval-only",
               "eval_fraction": "--eval-fraction", "mix_in_fraction": "--mix-in",
               "max_per_category": "--max-per-category", "eval_per_category": "--eval-per-category",
               "seed": "--seed", "optional_args": "--optional-args"}


AUGMENT_FLAGS = {"seed": "--seed", "multiplier": "--multiplier", "transforms": "--transforms",
                 "max_length": "--max-length", "model": "--model", "fc_token": "--fc-token"}


def register(app: typer.Typer) -> None:
    """Add the `data` command group to the top-level CLI."""
    data_app = typer.Typer(help="Prepare data: BFCL splits and exports.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("bfcl")
    def data_bfcl(
        out: Annotated[Path, typer.Option(help="Output directory for records, manifest and eval ids.")] = Path("runs/data"),
        categories: Annotated[str, typer.Option(help="Comma-separated BFCL v4 categories.")] = "simple_python,multiple,parallel,parallel_multiple,irrelevance",
        eval_only: Annotated[str, typer.Option(help="Categories that go wholly to eval (never trained on).")] = "",
        live_eval_only: Annotated[bool, typer.Option(help="Declare every live_* category eval-only.")] = True,
        eval_fraction: Annotated[float, typer.Option(help="Share of each trainable category held out for eval.")] = 0.5,
        mix_in: Annotated[float, typer.Option(help="Share of train that keeps ground-truth labels; the rest awaits the teacher.")] = 0.1,
        max_per_category: Annotated[str, typer.Option(help="Sample caps, e.g. live_multiple=100,live_irrelevance=50 (seeded).")] = "",
        eval_per_category: Annotated[str, typer.Option(help="Eval items of a category in place of --eval-fraction, e.g. "
                                                            "live_simple=200 (the rest trains, given --no-live-eval-only).")] = "",
        seed: Annotated[int, typer.Option(help="Seed of the split, mix-in choice and caps.")] = 42,
        optional_args: Annotated[str, typer.Option(help="Optional parameters in the canonical targets: omit (every "
                                                        "one the answer lets go unsaid), given (keep the value the "
                                                        "answer lists) or stated (keep it where the question says "
                                                        "it).")] = "omit",
    ) -> None:
        """Split BFCL v4 categories from the installed bfcl_eval into train/eval, with a manifest."""
        from pydantic import ValidationError

        from fcdistill.bfcl_env import BfclMissingError
        from fcdistill.data.bfcl import DataError, SplitOptions, prepare_bfcl

        try:
            opts = SplitOptions(categories=_csv(categories), eval_only=_csv(eval_only), live_eval_only=live_eval_only,
                                eval_fraction=eval_fraction, mix_in_fraction=mix_in,
                                max_per_category=_counts("--max-per-category", max_per_category),
                                eval_per_category=_counts("--eval-per-category", eval_per_category), seed=seed,
                                optional_args=optional_args)
            result = prepare_bfcl(opts, out)
        except ValidationError as exc:
            fail(validation_message(exc, SPLIT_FLAGS))
        except (DataError, BfclMissingError) as exc:
            fail(str(exc))
        typer.echo(result.summary())
        for warning in result.warnings:
            typer.echo(f"warning: {warning}", err=True)


    @data_app.command("export")
    def data_export(
        data: Annotated[Path, typer.Option(help="Directory written by `fcd data bfcl`.")] = Path("runs/data"),
        split: Annotated[str, typer.Option(help="train or eval.")] = "train",
        fmt: Annotated[str, typer.Option("--format", help="trl | openai | bedrock-prompt | bedrock-toolconfig")] = "trl",
        out: Annotated[Path | None, typer.Option(help="Output JSONL (default: DATA/export/SPLIT.FORMAT.jsonl).")] = None,
        model: Annotated[str, typer.Option(help="Student whose chat template renders TRL prompts.")] = "smollm2-135m",
        fc_token: Annotated[str, typer.Option(help="Function-call token text.")] = "<tool_call>",
        labels: Annotated[str, typer.Option(help="Which targets to use: labeled (mix-in + teacher) or ground-truth (all).")] = "labeled",
        tool_names: Annotated[str | None, typer.Option(help=(
            "safe: tool names OpenAI and Bedrock accept ([a-zA-Z0-9_-]; math.factorial -> math_factorial), the "
            "mapping back in OUT.tool_names.json; keep: BFCL's names [default: safe for openai and "
            "bedrock-toolconfig, keep for trl and bedrock-prompt]"), show_default=False)] = None,
    ) -> None:
        """Write one split in a training/evaluation format."""
        from fcdistill.data.bfcl import DataError
        from fcdistill.data.export import EXPORT_FORMATS, export_split, side_file

        if fmt not in EXPORT_FORMATS:
            fail(f"unknown --format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        try:
            path, n, skipped = export_split(data, split, fmt, out, model=model, fc_token=fc_token, labels=labels,
                                            tool_names=tool_names)
        except DataError as exc:
            fail(str(exc))
        notes = [f"{skipped} without a target skipped: {side_file(path, 'skipped.txt')}"] if skipped else []
        if side_file(path, "tool_names.json").is_file():
            notes.append(f"tool names made API-safe, mapping back in {side_file(path, 'tool_names.json')}")
        typer.echo(f"wrote {n} records to {path}" + (f" ({'; '.join(notes)})" if notes else ""))


    @data_app.command("augment")
    def data_augment(
        data: Annotated[Path, typer.Option(help="Directory written by `fcd data bfcl`; its train split is augmented.")] = Path("runs/data"),
        out: Annotated[Path, typer.Option(help="Output directory, in the same layout (originals + augmented records).")] = Path("runs/data-aug"),
        seed: Annotated[int, typer.Option(help="Seed of every transform; the same seed gives byte-identical files.")] = 42,
        multiplier: Annotated[int, typer.Option(help="Augmented records tried per source record.")] = 2,
        transforms: Annotated[str, typer.Option(help="Comma-separated: mask, shuffle, distract, compose, delete, substitute.")] = "mask,shuffle,distract,compose,delete,substitute",
        max_length: Annotated[int | None, typer.Option(help="Make no augmented record longer than this many tokens of --model (prompt + target, as training counts them); the slot tries its next transform.")] = None,
        model: Annotated[str, typer.Option(help="The student whose tokenizer counts --max-length (used only with it).")] = "smollm2-135m",
        fc_token: Annotated[str, typer.Option(help="The student's function-call token, counted with --max-length (used only with it).")] = "<tool_call>",
        progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    ) -> None:
        """Label-preserving transforms of the train split (name masking, tool shuffles and distractors,
        parallel composition, irrelevance by deletion, value substitution), verified and deduplicated."""
        from pydantic import ValidationError
        from rich.console import Console

        from fcdistill.data.augment import STATS_FILE, AugmentOptions, run_augment, stats_table
        from fcdistill.data.bfcl import DataError

        try:
            opts = AugmentOptions(data=data, out=out, seed=seed, multiplier=multiplier, transforms=_csv(transforms),
                                  max_length=max_length, model=model, fc_token=fc_token)
            result = run_augment(opts, progress=progress)
        except ValidationError as exc:
            fail(validation_message(exc, AUGMENT_FLAGS))
        except DataError as exc:
            fail(str(exc))
        Console().print(stats_table(result.stats))
        typer.echo(f"wrote {result.written} train records to {out}/train.jsonl in {result.seconds:.1f}s "
                   f"(stats: {out}/{STATS_FILE})")
