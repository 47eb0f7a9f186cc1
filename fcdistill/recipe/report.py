"""The report stage's report.md and `fcd runs show`: the stage table, the comparison, the charts.

Both read only the run directory (stage manifests, eval summaries, the training log), so a report
can be rebuilt, and a run shown, without the recipe file or any model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fcdistill.recipe.manifest import read_stage
from fcdistill.recipe.model import STAGES

LOSS_CHART = "loss.png"


def stage_rows(out: Path) -> list[dict[str, Any]]:
    """One row per stage folder with a manifest, in stage order."""
    rows = []
    for stage in STAGES:
        rec = read_stage(out, stage)
        if rec is None:
            continue
        seconds = (rec.get("seconds") or 0) + (rec.get("seconds_before") or 0)
        counts = rec.get("counts") or {}
        rows.append({"stage": stage, "status": rec.get("status", "?"), "seconds": round(seconds, 1),
                     "attempts": rec.get("attempts", 1), "finished": rec.get("finished"),
                     "counts": ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, (dict, list))),
                     "error": rec.get("error")})
    return rows


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def stage_markdown(out: Path, leave_out: tuple[str, ...] = ()) -> str:
    lines = ["| stage | status | time | counts | outputs |", "|---|---|---:|---|---|"]
    for row in stage_rows(out):
        if row["stage"] in leave_out:
            continue
        status = row["status"] + (f" ({row['attempts']} attempts)" if row["attempts"] > 1 else "")
        lines.append(f"| {row['stage']} | {status} | {_duration(row['seconds'])} | {row['counts']} | "
                     f"[{row['stage']}/](../{row['stage']}/) |")
    return "\n".join(lines) + "\n"


def loss_chart(train_dir: Path, path: Path) -> bool:
    """Training (and eval) loss against the step, from the training log; False when there is none."""
    from fcdistill.eval.report import _pyplot

    log = train_dir / "train_log.jsonl"
    if not log.is_file():
        return False
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(ctx: Any) -> dict[str, Any]:
    """The report stage: compare the eval runs, chart the loss, write report.md with links."""
    from fcdistill.eval.report import compare_runs
    recipe, out = ctx.recipe, ctx.dir("report")
    out.mkdir(parents=True, exist_ok=True)
    order = recipe.eval_order()
    table = compare_runs([ctx.dir("eval") / name for name in order], out)
    has_loss = recipe.train is not None and loss_chart(ctx.dir("train"), out / LOSS_CHART)
    parts = [f"# {recipe.name}", ""]
    if recipe.description:
        parts += [recipe.description.strip(), ""]
    # the report stage is still running while it writes this: its own row would say so
    parts += ["## Stages", "", stage_markdown(ctx.out, leave_out=("report",)), "The recipe as it ran: [recipe.yaml](../recipe.yaml).", "",
              f"## Held-out accuracy ({recipe.eval.split} split)", "", table.strip(), "",
              "![accuracy per category](compare.png)", ""]
    if has_loss:
        parts += ["## Training loss", "", f"![training loss]({LOSS_CHART})", ""]
    parts += ["## Per-model reports", ""]
    parts += [f"- {name}: [report](../eval/{name}/report.md), [answers](../eval/{name}/items.jsonl)" for name in order]
    (out / "report.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    data = json.loads((out / "compare.json").read_text())
    return {name: None if r["overall"]["accuracy"] is None else round(100 * r["overall"]["accuracy"], 1)
            for name, r in zip(order, data["runs"])}


def show(out: Path) -> str:
    """`fcd runs show`: the stage table and the final comparison, as text for a terminal."""
    from fcdistill.recipe.model import RecipeError

    rows = stage_rows(out)
    if not rows:
        raise RecipeError(f"{out} holds no recipe run (no STAGE/stage.json); run `fcd run RECIPE --out {out}`")
    width = max(len(r["stage"]) for r in rows)
    lines = [f"{'stage':<{width}}  {'status':<9} {'time':>9}  counts"]
    for r in rows:
        status = r["status"] + (f" x{r['attempts']}" if r["attempts"] > 1 else "")
        lines.append(f"{r['stage']:<{width}}  {status:<9} {_duration(r['seconds']):>9}  {r['counts']}")
        if r["error"] and r["status"] != "done":
            lines.append(f"{'':<{width}}  error: {r['error']}")
    compare = out / "report" / "compare.md"
    if compare.is_file():
        lines += ["", compare.read_text(encoding="utf-8").strip(), "", f"report: {out / 'report' / 'report.md'}"]
    return "\n".join(lines)
