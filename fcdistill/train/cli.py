"""`fcd train` and `fcd export`. Heavy libraries (torch, trl, peft) load inside the commands only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fcdistill.errors import fail


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level CLI."""

    @app.command("train")
    def train_cmd(
        config: Annotated[Path, typer.Option("--config", "-c", help="Training config YAML (see configs/).")],
        resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in output_dir.")] = False,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field, e.g. --set max_steps=20 "
                                                       "--set lora.r=8 (value read as YAML).")] = None,
        check: Annotated[bool, typer.Option(help="Validate the config and data, print their stats, load no model.")] = False,
    ) -> None:
        """SFT of the student around the FC token (TRL; LoRA via PEFT, or `finetune: full`); `accelerate launch -m fcdistill.train` runs the same."""
        from fcdistill.train.config import ConfigError
        from fcdistill.train.sft import Prepared, run

        try:
            result = run(config, resume=resume, overrides=list(set_ or []), check_only=check)
        except ConfigError as exc:
            fail(str(exc))
        if isinstance(result, Prepared):
            import json

            fc = result.fc
            typer.echo(f"config ok: student {result.model_dir}, FC token {fc.token!r} id {fc.token_id} "
                       f"({'added' if fc.added else 'reused'})")
            typer.echo(json.dumps(result.stats))
            return
        typer.echo(f"trained {result.global_step} steps; {result.final_dir.name}: {result.final_dir}")

    @app.command("export")
    def export_cmd(
        adapter: Annotated[Path, typer.Option(help="Adapter directory, a full fine-tune's model/, or the training run directory holding either.")],
        out: Annotated[Path, typer.Option(help="Output directory for the merged model.")],
        merge: Annotated[bool, typer.Option("--merge", help="Merge the adapter into the base weights (full model).")] = False,
        dtype: Annotated[str, typer.Option(help="auto (the base checkpoint's dtype) | fp32 | bf16 | fp16.")] = "auto",
        overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    ) -> None:
        """Write a merged full model (vLLM and `fcd serve --model` load it) from a trained adapter."""
        from fcdistill.train.export import ExportError, merge_adapter

        if not merge:
            fail("nothing to export: an adapter is already loadable by `fcd serve --adapter` (a full fine-tune's "
                 "model/ by `fcd serve --model`); pass --merge to write one full model")
        try:
            path = merge_adapter(adapter, out, dtype=dtype, overwrite=overwrite)
        except ExportError as exc:
            fail(str(exc))
        typer.echo(f"merged model written to {path}")
