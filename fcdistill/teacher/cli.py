"""`fcd label`, `fcd synth` and `fcd verify`: teacher labeling and synthetic data with verification.

Heavy imports (openai, datasketch, bfcl_eval) happen inside the commands. Bad input is one line on
stderr and exit code 2; teacher errors that outlast the retries leave the run resumable and exit 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fcdistill.errors import fail

# Teacher endpoint options, shared by the commands (flags override --teacher-config).
TeacherConfigOpt = Annotated[Optional[Path], typer.Option("--teacher-config", help="YAML with teacher settings (keys as the flags, snake_case).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Teacher model name at the endpoint.")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable with the API key (default OPENAI_API_KEY).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="Sampling temperature (default 0).")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", help="Max completion tokens per request (default 512).")]
ConcurrencyOpt = Annotated[Optional[int], typer.Option("--concurrency", help="Requests in flight at most (default 8).")]
ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="tools (the tools parameter) or prompt (BFCL python-syntax prompt).")]
StructuredOpt = Annotated[Optional[str], typer.Option("--structured", help="JSON replies: text, schema (response_format json_schema) or tool (a forced schema-tool call).")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Seconds per request attempt (default 120).")]
AttemptsOpt = Annotated[Optional[int], typer.Option("--max-attempts", help="Tries per request incl. the first (default 6).")]
PriceInOpt = Annotated[Optional[float], typer.Option("--price-in", help="USD per million prompt tokens, for a cost estimate.")]
PriceOutOpt = Annotated[Optional[float], typer.Option("--price-out", help="USD per million completion tokens.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache", help="SQLite cache of answered requests (default: in the output dir).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
TemplatesOpt = Annotated[Optional[Path], typer.Option("--templates", help="YAML prompt templates overriding the shipped defaults.")]


TEACHER_FLAGS = ("base_url", "model", "api_key_env", "temperature", "max_tokens", "concurrency", "mode", "structured",
                 "timeout", "max_attempts", "price_in", "price_out", "cache", "progress")


def _teacher(config: Path | None, given: dict[str, Any]) -> Any:
    """The teacher settings: --teacher-config overridden by the teacher flags among a command's arguments."""
    from fcdistill.teacher.config import load_teacher_config

    flags = {k: given[k] for k in TEACHER_FLAGS if k in given}
    renamed = {"timeout_s": flags.pop("timeout", None), "price_input_per_mtok": flags.pop("price_in", None),
               "price_output_per_mtok": flags.pop("price_out", None)}
    return load_teacher_config(config, {**flags, **renamed})


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Bad settings or input, and teacher failures, as one line on stderr (exit 2)."""
    from pydantic import ValidationError

    from fcdistill.errors import validation_message
    from fcdistill.teacher.config import TeacherError

    try:
        yield
    except ValidationError as exc:
        fail(validation_message(exc))
    except TeacherError as exc:
        fail(str(exc))


def _styles(text: str) -> dict[str, float]:
    from fcdistill.teacher.config import TeacherError

    out: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise TeacherError(f"--styles: expected STYLE=WEIGHT, got {part!r}") from None
    return out


def register(app: typer.Typer) -> None:
    """Add the teacher commands to the top-level CLI."""

    @app.command("label")
    def label(
        data: Annotated[Path, typer.Option(help="Directory written by `fcd data bfcl` (train.jsonl, manifest.json).")] = Path("runs/data"),
        out: Annotated[Optional[Path], typer.Option(help="Labels directory (default DATA/labels).")] = None,
        samples: Annotated[int, typer.Option(help="Samples per item; > 1 votes by majority (self-consistency).")] = 1,
        min_agreement: Annotated[float, typer.Option(help="Share of samples the winning answer needs.")] = 0.5,
        judge: Annotated[bool, typer.Option("--judge/--no-judge", help="Also ask the teacher to judge each label.")] = False,
        mix_in: Annotated[bool, typer.Option("--mix-in/--no-mix-in", help="Ask on mix-in items too and score the teacher with bfcl_eval.")] = True,
        limit: Annotated[Optional[int], typer.Option(help="Label only the first N teacher items.")] = None,
        overwrite: Annotated[bool, typer.Option(help="Relabel when the settings changed since the last run.")] = False,
        templates: TemplatesOpt = None,
        teacher_config: TeacherConfigOpt = None, base_url: BaseUrlOpt = None, model: ModelOpt = None,
        api_key_env: ApiKeyEnvOpt = None, temperature: TemperatureOpt = None, max_tokens: MaxTokensOpt = None,
        concurrency: ConcurrencyOpt = None, mode: ModeOpt = None, structured: StructuredOpt = None,
        timeout: TimeoutOpt = None, max_attempts: AttemptsOpt = None, price_in: PriceInOpt = None,
        price_out: PriceOutOpt = None, cache: CacheOpt = None, progress: ProgressOpt = True,
    ) -> None:
        """Label the BFCL train items marked for the teacher (resumable); score the teacher on mix-in."""
        from fcdistill.teacher.label import LabelOptions, run_label
        from fcdistill.teacher.templates import load_templates

        given = locals()
        with _one_line_errors():
            cfg = _teacher(teacher_config, given)
            opts = LabelOptions(data=data, out=out, samples=samples, min_agreement=min_agreement, judge=judge,
                                mix_in=mix_in, limit=limit, overwrite=overwrite)
            summary = run_label(cfg, opts, load_templates(templates))
        typer.echo(summary.text())
        if summary.teacher_errors:
            fail(f"{summary.teacher_errors} items failed at the teacher after retries; rerun to resume", code=1)

    @app.command("synth")
    def synth(
        out: Annotated[Path, typer.Option(help="Output directory (records, exports, report, cache).")] = Path("runs/synth"),
        tools: Annotated[Optional[Path], typer.Option(help="OpenAI tool JSON (default: the shipped travel example).")] = None,
        seeds: Annotated[Optional[Path], typer.Option(help="Seed examples JSONL {query, calls} (default: the shipped example).")] = None,
        count: Annotated[int, typer.Option(help="Examples to ask the generator for.")] = 24,
        per_request: Annotated[int, typer.Option(help="Examples per generation request.")] = 4,
        styles: Annotated[str, typer.Option(help="Style weights: simple, multiple, parallel, parallel_multiple.")] = "simple=0.4,multiple=0.2,parallel=0.2,parallel_multiple=0.2",
        irrelevance_ratio: Annotated[float, typer.Option(help="Target share of irrelevance (function-masked) examples.")] = 0.1,
        answer: Annotated[str, typer.Option(help="joint: the generator writes calls; teacher: the teacher answers its queries with tools.")] = "joint",
        shots: Annotated[int, typer.Option(help="Seed examples shown per request.")] = 3,
        gen_temperature: Annotated[float, typer.Option(help="Temperature of generation requests.")] = 0.8,
        gen_max_tokens: Annotated[int, typer.Option(help="Max tokens of a generation reply.")] = 1024,
        exec_module: Annotated[Optional[str], typer.Option(help="Python file of tool implementations ('example': the shipped one).")] = None,
        exec_timeout: Annotated[float, typer.Option(help="Seconds per executed call.")] = 5.0,
        judge: Annotated[bool, typer.Option("--judge/--no-judge", help="Semantic check by the teacher as judge.")] = True,
        eval_data: Annotated[Optional[Path], typer.Option(help="Data dir whose eval split must not leak in (ids, 13-grams).")] = None,
        dedup_threshold: Annotated[float, typer.Option(help="Near-duplicate Jaccard threshold (char 5-grams, MinHash).")] = 0.8,
        ngram: Annotated[int, typer.Option(help="Word n-gram length of the contamination check.")] = 13,
        val_fraction: Annotated[float, typer.Option(help="Share of kept examples in the validation split.")] = 0.1,
        seed: Annotated[int, typer.Option(help="Seed of the plan and the split.")] = 0,
        export: Annotated[str, typer.Option(help="Export formats: openai and/or trl (trl loads --student's tokenizer).")] = "openai",
        student: Annotated[str, typer.Option(help="Student whose chat template renders the trl export.")] = "smollm2-135m",
        templates: TemplatesOpt = None,
        teacher_config: TeacherConfigOpt = None, base_url: BaseUrlOpt = None, model: ModelOpt = None,
        api_key_env: ApiKeyEnvOpt = None, temperature: TemperatureOpt = None, max_tokens: MaxTokensOpt = None,
        concurrency: ConcurrencyOpt = None, mode: ModeOpt = None, structured: StructuredOpt = None,
        timeout: TimeoutOpt = None, max_attempts: AttemptsOpt = None, price_in: PriceInOpt = None,
        price_out: PriceOutOpt = None, cache: CacheOpt = None, progress: ProgressOpt = True,
    ) -> None:
        """Generate query/call pairs from tools + seeds, verify them, dedup, filter, split and export."""
        from fcdistill.teacher.config import TeacherError
        from fcdistill.teacher.inputs import Domain, SynthOptions, example_domain, load_seeds, load_tools
        from fcdistill.teacher.synth import run_synth
        from fcdistill.teacher.templates import load_templates

        given = locals()
        with _one_line_errors():
            if (tools is None) != (seeds is None):
                raise TeacherError("give both --tools and --seeds, or neither (the shipped example domain)")
            if tools is not None and seeds is not None:
                specs = load_tools(tools)
                domain = Domain(specs, load_seeds(seeds, specs))
            else:
                domain = example_domain()
            cfg = _teacher(teacher_config, given)
            opts = SynthOptions(out=out, count=count, per_request=per_request, styles=_styles(styles),
                                irrelevance_ratio=irrelevance_ratio, answer=answer, shots=shots,
                                gen_temperature=gen_temperature, gen_max_tokens=gen_max_tokens,
                                exec_module=exec_module, exec_timeout_s=exec_timeout, judge=judge,
                                eval_data=eval_data, dedup_threshold=dedup_threshold, ngram=ngram,
                                val_fraction=val_fraction, seed=seed,
                                export=[e.strip() for e in export.split(",") if e.strip()], model=student)
            result = run_synth(cfg, opts, load_templates(templates), domain)
        typer.echo(result.text())
        if result.teacher_errors:
            fail(f"{result.teacher_errors} examples failed at the teacher after retries; rerun to resume", code=1)

    @app.command("verify")
    def verify(
        input: Annotated[Path, typer.Option("--input", help="JSONL of examples {query, calls, tools?, style?, id?}.")],
        out: Annotated[Path, typer.Option(help="Output directory (verified.jsonl, rejected.jsonl, report).")] = Path("runs/verify"),
        tools: Annotated[Optional[Path], typer.Option(help="OpenAI tool JSON for lines that carry no tools.")] = None,
        exec_module: Annotated[Optional[str], typer.Option(help="Python file of tool implementations ('example': the shipped one).")] = None,
        exec_timeout: Annotated[float, typer.Option(help="Seconds per executed call.")] = 5.0,
        judge: Annotated[bool, typer.Option("--judge/--no-judge", help="Semantic check by the teacher as judge (needs a teacher).")] = False,
        eval_data: Annotated[Optional[Path], typer.Option(help="Data dir whose eval split must not leak in (ids, 13-grams).")] = None,
        dedup_threshold: Annotated[float, typer.Option(help="Near-duplicate Jaccard threshold.")] = 0.8,
        ngram: Annotated[int, typer.Option(help="Word n-gram length of the contamination check.")] = 13,
        templates: TemplatesOpt = None,
        teacher_config: TeacherConfigOpt = None, base_url: BaseUrlOpt = None, model: ModelOpt = None,
        api_key_env: ApiKeyEnvOpt = None, temperature: TemperatureOpt = None, max_tokens: MaxTokensOpt = None,
        concurrency: ConcurrencyOpt = None, structured: StructuredOpt = None, timeout: TimeoutOpt = None,
        max_attempts: AttemptsOpt = None, price_in: PriceInOpt = None, price_out: PriceOutOpt = None,
        cache: CacheOpt = None, progress: ProgressOpt = True,
    ) -> None:
        """Run the verification stages (format, execution, duplicates, contamination, judge) on any examples."""
        from fcdistill.teacher.inputs import VerifyOptions
        from fcdistill.teacher.templates import load_templates
        from fcdistill.teacher.verify import run_verify

        given = locals()
        with _one_line_errors():
            cfg = None
            if teacher_config is not None or base_url is not None or model is not None:
                cfg = _teacher(teacher_config, given)
            opts = VerifyOptions(input=input, out=out, tools=tools, exec_module=exec_module,
                                 exec_timeout_s=exec_timeout, judge=judge, eval_data=eval_data,
                                 dedup_threshold=dedup_threshold, ngram=ngram, progress=progress)
            table = run_verify(cfg, opts, load_templates(templates))
        typer.echo(table.markdown("verified examples") + f"wrote {out}/verified.jsonl, rejected.jsonl, report.json")
