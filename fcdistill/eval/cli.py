"""`fcd eval run | compare | official`. Heavy imports (openai, bfcl_eval, matplotlib) stay inside the commands.

Bad input (manifest, categories, an unreachable endpoint) is one line on stderr and exit code 2; a run
that leaves questions unanswered after the retries exits 1 and resumes when run again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fcdistill.errors import fail

eval_app = typer.Typer(help="Evaluate any OpenAI-compatible endpoint on the BFCL eval split.", no_args_is_help=True)

EndpointOpt = Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (/v1 is added to a bare host).")]
ModelOpt = Annotated[str, typer.Option(help="Model name at the endpoint (an adapter name selects it on `fcd serve`).")]
ManifestOpt = Annotated[Path, typer.Option(help="Data dir written by `fcd data bfcl`, or its manifest.json.")]
ModeOpt = Annotated[str, typer.Option(help="fc: send `tools`, read tool_calls; prompt: BFCL's python-syntax system prompt, bfcl_eval's decoder.")]
ApiKeyOpt = Annotated[Optional[str], typer.Option(help="Bearer key for the endpoint.")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option(help="Environment variable holding the key (instead of --api-key).")]
MaxTokensOpt = Annotated[int, typer.Option(help="Max completion tokens per question.")]
ToolChoiceOpt = Annotated[Optional[str], typer.Option(help="fc mode: send this tool_choice (auto|required|none); BFCL sends none.")]


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _key(api_key: str | None, api_key_env: str | None) -> str | None:
    if api_key:
        return api_key
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            fail(f"--api-key-env {api_key_env}: the variable is not set")
        return value
    return None


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    run = summary["run"]
    table = Table(title=f"{run['label']} — {run['mode']} mode, {run['model']}", title_justify="left")
    for col, justify in (("category", "left"), ("correct", "right"), ("n", "right"), ("accuracy", "right"),
                         ("95% CI", "right"), ("cut / closed", "right"), ("most common error", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, c in summary["categories"].items():
        acc = "—" if c["accuracy"] is None else f"{100 * c['accuracy']:.1f}%"
        ci = f"{100 * c['ci95'][0]:.0f}–{100 * c['ci95'][1]:.0f}%" if c["ci95"] else "—"
        top = next(iter(c["error_types"].items()), None)
        closed = f"{c['cut']} / {sum(c['forced_close'].values())}"  # hit max_tokens / closed by fcd serve's guard
        table.add_row(name, str(c["correct"]), f"{c['answered']}/{c['total']}" if c["answered"] != c["total"]
                      else str(c["answered"]), acc, ci, closed, f"{top[0]} ({top[1]})" if top else "")
    o = summary["overall"]
    table.add_row("overall (mean)", str(o["correct"]), str(o["answered"]),
                  "—" if o["accuracy"] is None else f"{100 * o['accuracy']:.1f}%", "", "", "", style="bold")
    console = Console(stderr=False)
    console.print(table)
    inv = run["this_invocation"]
    console.print(f"asked {inv['asked']}, kept {inv['skipped_already_answered']} earlier answers, "
                  f"{inv['transport_errors']} transport errors, {inv['seconds']}s; "
                  f"wrote {out}/summary.json, report.md, chart.png, items.jsonl")
    for note in inv.get("notes", []):
        console.print(f"note: {note}")


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the top-level CLI."""
    app.add_typer(eval_app, name="eval")


@eval_app.command("run")
def run_cmd(
    endpoint: EndpointOpt,
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="Run directory (outputs.jsonl, items.jsonl, summary.json, report.md, chart.png).")],
    manifest: ManifestOpt = Path("runs/data"),
    categories: Annotated[str, typer.Option(help="Comma-separated categories (default: every category of the eval split).")] = "",
    mode: ModeOpt = "fc",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 4,
    api_key: ApiKeyOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.0,
    tool_names: Annotated[str, typer.Option(help="auto: BFCL's names, API-safe ones if the endpoint rejects them; original; safe.")] = "auto",
    tool_choice: ToolChoiceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Ask only the first N items of each category.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request attempt.")] = 300.0,
    max_attempts: Annotated[int, typer.Option(help="Tries per request, the first included (connection errors, 5xx, 429).")] = 4,
    label: Annotated[Optional[str], typer.Option(help="Name of this run in reports and comparisons (default: --model).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    max_steps: Annotated[int, typer.Option(help="Multi-turn: steps one turn may take before the conversation is cut (BFCL's limit: 20).")] = 20,
) -> None:
    """Ask the eval questions (resumable: answered ids are skipped), score with bfcl_eval, write reports.
    Multi-turn categories are whole conversations against bfcl_eval's simulated backends."""
    from fcdistill.eval.dataset import EvalError
    from fcdistill.eval.runner import EvalOptions, execute

    try:
        opts = EvalOptions(endpoint=endpoint, model=model, manifest=manifest, out=out, categories=_csv(categories) or None,
                           mode=mode, concurrency=concurrency, api_key=_key(api_key, api_key_env),  # type: ignore[arg-type]
                           max_tokens=max_tokens, temperature=temperature, tool_names=tool_names,  # type: ignore[arg-type]
                           tool_choice=tool_choice, limit_per_category=limit, timeout_s=timeout,
                           max_attempts=max_attempts, progress=progress, label=label, max_steps=max_steps)
        summary = execute(opts)
    except EvalError as exc:
        fail(str(exc))
    _print_summary(summary, out)
    missing = summary["overall"]["total"] - summary["overall"]["answered"]
    if missing:
        last = summary["run"]["this_invocation"].get("last_transport_error", "")
        fail(f"{missing} questions have no answer ({last[:160]}); rerun the same command to resume", code=1)


@eval_app.command("compare")
def compare_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories of `fcd eval run`; the first is the baseline.")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write compare.json, compare.md, compare.png (default: the first run's parent).")] = None,
) -> None:
    """One table and one chart across runs, with counts and paired differences against the first."""
    from rich.console import Console
    from rich.table import Table

    from fcdistill.eval.dataset import EvalError
    from fcdistill.eval.report import compare_data, write_compare

    try:
        data = compare_data(run_dirs)
    except EvalError as exc:
        fail(str(exc))
    target = out or run_dirs[0].resolve().parent
    write_compare(data, target)
    table = Table(title=f"BFCL accuracy (paired with {data['baseline']})", title_justify="left")
    table.add_column("category")
    for r in data["runs"]:
        table.add_column(r["label"], justify="right")
    for c in data["categories"]:
        row = []
        for r in data["runs"]:
            cell = r["categories"].get(c)
            text = "—" if not cell or cell["accuracy"] is None else \
                f"{100 * cell['accuracy']:.1f}% ({cell['correct']}/{cell['answered']})"
            vs = (r.get("vs_first") or {}).get(c)
            if vs and vs["paired"]:
                text += f" +{vs['gained']}/−{vs['lost']} p={vs['p_mcnemar']:.2g}"
            row.append(text)
        table.add_row(c, *row)
    table.add_row("overall (mean)", *[f"{100 * (r['overall']['accuracy'] or 0):.1f}%" for r in data["runs"]], style="bold")
    if "overall_shared" in data["runs"][0]:
        table.add_row(f"overall, {len(data['shared_categories'])} shared", *[
            f"{100 * (r['overall_shared']['accuracy'] or 0):.1f}%" for r in data["runs"]], style="bold")
    console = Console()
    console.print(table)
    console.print(f"wrote {target}/compare.json, compare.md, compare.png")


@eval_app.command("official")
def official_cmd(
    out: Annotated[Path, typer.Option(help="BFCL_PROJECT_ROOT for bfcl (result/, score/, crosscheck.json).")],
    endpoint: Annotated[Optional[str], typer.Option(help="Endpoint for `bfcl generate` (with --model, --category).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name at the endpoint.")] = None,
    category: Annotated[Optional[str], typer.Option(help="One BFCL category of the eval split.")] = None,
    manifest: ManifestOpt = Path("runs/data"),
    mode: ModeOpt = "fc",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N eval ids of the category.")] = None,
    max_tokens: MaxTokensOpt = 256,
    tool_choice: ToolChoiceOpt = None,
    api_key: ApiKeyOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    run: Annotated[Optional[Path], typer.Option(help="Instead: have `bfcl evaluate` score this `fcd eval run` dir's answers.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Multi-turn: bfcl's per-turn step limit (default: bfcl's 20); set it as the run being compared set it.")] = None,
) -> None:
    """Cross-check with bfcl-eval's own generate + evaluate; exits 1 if its accuracy differs from ours."""
    from fcdistill.eval.dataset import EvalError
    from fcdistill.eval.official import official_check, official_rescore

    try:
        if run is not None:
            report = official_rescore(run, out)
            parts = report["categories"]
            agree = report["all_agree"]
        else:
            if not (endpoint and model and category):
                fail("give --endpoint, --model and --category (or --run RUN_DIR)")
            report = official_check(endpoint, model, manifest, category, out, mode=mode, limit=limit,  # type: ignore[arg-type]
                                    max_tokens=max_tokens, api_key=_key(api_key, api_key_env), tool_choice=tool_choice,
                                    max_steps=max_steps)
            parts = [report]
            agree = report["same_accuracy"] and report["same_items"]
    except EvalError as exc:
        fail(str(exc))
    for p in parts:
        o, u = p["official"], p["ours"]
        typer.echo(f"{p['category']}: bfcl evaluate {o['correct']}/{o['total']} = {100 * o['accuracy']:.1f}%; "
                   f"ours {u['correct']}/{u['total']}" + ("" if not p["disagreements"] else
                                                          f"; items judged differently: {', '.join(p['disagreements'])}"))
    typer.echo(f"wrote {out}/crosscheck.json")
    if not agree:
        fail("bfcl-eval's own evaluation differs from ours", code=1)
