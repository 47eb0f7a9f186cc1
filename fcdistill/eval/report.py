"""Per-category accuracy with counts, in JSON, Markdown and a PNG chart; comparisons across runs.

Small eval sets make small differences meaningless, so every accuracy carries its counts and a
Wilson 95% interval, and a comparison counts, item by item, what one run got right that the first
did not (and the reverse) with an exact McNemar p-value: that is what says whether tuned beats base.
Overall accuracy is the unweighted mean of the category accuracies; a run over BFCL categories also
gets BFCL's group and overall scores, aggregated as its leaderboard does (eval/leaderboard.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from fcdistill.data.bfcl import KNOWN_CATEGORIES
from fcdistill.eval.dataset import EvalError

SUMMARY = "summary.json"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; sensible at n = 5, unlike the normal approximation."""
    if n == 0:
        return None
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs (binomial, p = 1/2)."""
    n = gained + lost
    if n == 0:
        return 1.0
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _answers(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The completions in one output row: the row itself, or every step of a multi-turn conversation."""
    return [step for turn in row["turns"] for step in turn] if "turns" in row else [row]


def summarize(scores: list[Any], items: list[Any], run: dict[str, Any]) -> dict[str, Any]:
    """Per-category counts and accuracy, overall as the unweighted mean over answered categories."""
    totals = Counter(it.category for it in items)
    cats: dict[str, dict[str, Any]] = {}
    for category in dict.fromkeys(it.category for it in items):
        mine = [s for s in scores if s.category == category]
        correct = sum(s.valid for s in mine)
        ci = wilson(correct, len(mine))
        cats[category] = {
            "total": totals[category], "answered": len(mine), "correct": correct,
            "accuracy": correct / len(mine) if mine else None, "ci95": list(ci) if ci else None,
            "error_types": dict(Counter(s.error_type for s in mine if not s.valid).most_common()),
            "cut": sum(any(a.get("finish_reason") == "length" for a in _answers(s.raw)) for s in mine),  # hit max_tokens
            "forced_close": dict(Counter(a["forced_close"] for s in mine for a in _answers(s.raw) if a.get("forced_close"))),
        }
    accs = [c["accuracy"] for c in cats.values() if c["accuracy"] is not None]
    answered = sum(c["answered"] for c in cats.values())
    overall = {"accuracy": sum(accs) / len(accs) if accs else None, "categories": len(accs),
               "answered": answered, "correct": sum(c["correct"] for c in cats.values()),
               "total": sum(c["total"] for c in cats.values()),
               "micro_accuracy": sum(c["correct"] for c in cats.values()) / answered if answered else None}
    summary = {"run": run, "categories": cats, "overall": overall, "complete": answered == overall["total"]}
    if any(c in KNOWN_CATEGORIES for c in cats):
        from fcdistill.eval.leaderboard import bfcl_scores

        summary["bfcl"] = bfcl_scores(cats)
    return summary


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def markdown_report(summary: dict[str, Any]) -> str:
    run, cats, overall = summary["run"], summary["categories"], summary["overall"]
    lines = [f"# BFCL eval: {run['label']}", "",
             f"model `{run['model']}` at {run['endpoint']}, mode `{run['mode']}`, bfcl-eval {run['bfcl_eval_version']}, "
             f"max_tokens {run['max_tokens']}, temperature {run['temperature']}"
             + (f", tool_choice {run['tool_choice']}" if run.get("tool_choice") else ""), "",
             "| category | correct / answered | accuracy | 95% CI | cut / force-closed | most common error |",
             "|---|---:|---:|---:|---:|---|"]
    for name, c in cats.items():
        ci = f"{_pct(c['ci95'][0])}–{_pct(c['ci95'][1])}" if c["ci95"] else "—"
        top = next(iter(c["error_types"].items()), None)
        err = f"{top[0]} ({top[1]})" if top else ""
        shown = f"{c['correct']} / {c['answered']}" + (f" (of {c['total']})" if c["answered"] != c["total"] else "")
        closed = ", ".join(f"{n} {reason}" for reason, n in c["forced_close"].items()) or "0"
        lines.append(f"| {name} | {shown} | {_pct(c['accuracy'])} | {ci} | {c['cut']} / {closed} | {err} |")
    lines.append(f"| **overall** (mean of {overall['categories']} categories) | {overall['correct']} / "
                 f"{overall['answered']} | **{_pct(overall['accuracy'])}** | | | |")
    if summary.get("bfcl"):
        from fcdistill.eval.leaderboard import markdown

        lines += markdown(summary["bfcl"])
    if not summary["complete"]:
        lines += ["", f"Incomplete: {overall['total'] - overall['answered']} items have no answer yet; "
                      "rerun the same command to resume."]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(summary: dict[str, Any], path: Path) -> None:
    """Accuracy per category with Wilson intervals and counts; the overall mean as the last bar."""
    plt = _pyplot()
    cats = summary["categories"]
    names = [*cats, "overall"]
    accs = [cats[c]["accuracy"] or 0.0 for c in cats] + [summary["overall"]["accuracy"] or 0.0]
    lo = [(a - cats[c]["ci95"][0]) if cats[c]["ci95"] else 0.0 for c, a in zip(cats, accs)] + [0.0]
    hi = [(cats[c]["ci95"][1] - a) if cats[c]["ci95"] else 0.0 for c, a in zip(cats, accs)] + [0.0]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 1.5), 4.2))
    colors = ["#4C72B0"] * len(cats) + ["#DD8452"]
    bars = ax.bar(range(len(names)), accs, yerr=[lo, hi], capsize=3, color=colors, ecolor="#555555")
    for b, a, h in zip(bars, accs, hi):
        ax.annotate(f"{100 * a:.0f}%", (b.get_x() + b.get_width() / 2, a + h), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ticks = [f"{c}\n{cats[c]['correct']}/{cats[c]['answered']}" for c in cats] + ["overall\n(mean)"]
    ax.set_xticks(range(len(names)), ticks, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy (bfcl_eval checker)")
    ax.set_title(f"{summary['run']['label']} ({summary['run']['mode']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out: Path, summary: dict[str, Any]) -> None:
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    (out / "report.md").write_text(markdown_report(summary))
    bar_chart(summary, out / "chart.png")


# -- comparing runs ---------------------------------------------------------------------------------
def _load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[str, bool]]]:
    path = run_dir / SUMMARY
    if not path.is_file():
        raise EvalError(f"{run_dir} has no {SUMMARY}: is it an `fcd eval run` output dir?")
    summary = json.loads(path.read_text())
    valid: dict[str, tuple[str, bool]] = {}  # id -> (category, correct)
    items = run_dir / "items.jsonl"
    if items.is_file():
        for line in items.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                valid[row["id"]] = (row["category"], bool(row["valid"]))
    return summary, valid


def compare_data(run_dirs: list[Path]) -> dict[str, Any]:
    """Accuracies of several runs side by side, each later run paired item by item with the first."""
    if not run_dirs:
        raise EvalError("give at least one run dir to compare")
    loaded = [_load_run(Path(d)) for d in run_dirs]
    labels = [s["run"]["label"] for s, _ in loaded]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({Path(d).name})" for lab, d in zip(labels, run_dirs)]
    categories = list(dict.fromkeys(c for s, _ in loaded for c in s["categories"]))
    runs = []
    base_valid = loaded[0][1]
    for (summary, valid), label, d in zip(loaded, labels, run_dirs):
        entry: dict[str, Any] = {"label": label, "dir": str(d), "model": summary["run"]["model"],
                                 "mode": summary["run"]["mode"], "overall": summary["overall"],
                                 "categories": summary["categories"], "complete": summary["complete"]}
        if valid is not base_valid:
            paired: dict[str, Any] = {}
            for c in categories:
                ids = [i for i, (cat, _) in valid.items() if cat == c and i in base_valid]
                gained = sum(valid[i][1] and not base_valid[i][1] for i in ids)
                lost = sum(base_valid[i][1] and not valid[i][1] for i in ids)
                paired[c] = {"paired": len(ids), "gained": gained, "lost": lost, "p_mcnemar": mcnemar_p(gained, lost)}
            entry["vs_first"] = paired
        runs.append(entry)
    shared = [c for c in categories if all(c in s["categories"] and s["categories"][c]["accuracy"] is not None
                                           for s, _ in loaded)]
    if shared != categories:  # means over different category sets are not comparable; this one is
        for r in runs:
            accs = [r["categories"][c]["accuracy"] for c in shared]
            r["overall_shared"] = {"accuracy": sum(accs) / len(accs) if accs else None, "categories": len(accs)}
    return {"categories": categories, "shared_categories": shared, "runs": runs, "baseline": labels[0]}


def _cell(c: dict[str, Any] | None) -> str:
    if not c or c.get("accuracy") is None:
        return "—"
    return f"{_pct(c['accuracy'])} ({c['correct']}/{c['answered']})"


def compare_markdown(data: dict[str, Any]) -> str:
    runs = data["runs"]
    head = "| category | " + " | ".join(r["label"] for r in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for c in data["categories"]:
        cells = []
        for r in runs:
            cell = _cell(r["categories"].get(c))
            vs = (r.get("vs_first") or {}).get(c)
            if vs and vs["paired"]:
                cell += f" [+{vs['gained']}/−{vs['lost']}, p={vs['p_mcnemar']:.2g}]"
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **overall** (mean of categories) | " + " | ".join(
        f"**{_pct(r['overall']['accuracy'])}** ({r['overall']['correct']}/{r['overall']['answered']})" for r in runs) + " |")
    if runs and "overall_shared" in runs[0]:
        lines.append(f"| **overall on the {len(data['shared_categories'])} shared categories** | " + " | ".join(
            f"**{_pct(r['overall_shared']['accuracy'])}**" for r in runs) + " |")
    notes = [f"Runs after the first show, per category, items they got right that {data['baseline']} got wrong (+), "
             "the reverse (−), and the exact McNemar p-value of that difference."]
    if any(not r["complete"] for r in runs):
        notes.append("Some runs are incomplete (items without an answer); their accuracy is over answered items.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def compare_chart(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    cats = [*data["categories"], "overall"]
    runs = data["runs"]
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(cats) * max(1, len(runs)) * 0.55 + 2), 4.4))
    for k, r in enumerate(runs):
        accs, labels = [], []
        for c in cats:
            cell = r["overall"] if c == "overall" else r["categories"].get(c)
            accs.append((cell or {}).get("accuracy") or 0.0)
            labels.append(f"{cell['correct']}/{cell['answered']}" if cell and cell.get("answered") else "")
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(cats))]
        bars = ax.bar(xs, accs, width=width, label=r["label"])
        for b, text in zip(bars, labels):
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=6, xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (bfcl_eval checker)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_compare(data: dict[str, Any], out: Path) -> str:
    """compare.json, compare.md and compare.png in `out`; returns the Markdown."""
    md = compare_markdown(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "compare.md").write_text(md)
    compare_chart(data, out / "compare.png")
    return md


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Markdown table comparing runs (base, tuned, teacher); also writes compare.{json,md,png} to out_dir."""
    data = compare_data([Path(d) for d in run_dirs])
    return write_compare(data, Path(out_dir)) if out_dir is not None else compare_markdown(data)
