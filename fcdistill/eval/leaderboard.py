"""BFCL's group and overall scores, aggregated as its leaderboard aggregates them, over what a run has.

The arithmetic is bfcl_eval's own (eval_runner_helper's unweighted, count-weighted and percentage-
weighted means) with the leaderboard's groups and weights. The leaderboard counts a category that was
not run as 0; so does this, and every group names the categories it lacks, so that a partial run is
never read as a leaderboard score. Runs here use BFCL's held-out half (`fcd data bfcl`), not the whole
set, and the live group weights categories by the items answered: comparable, not identical.
"""

from __future__ import annotations

from typing import Any

# Leaderboard groups (bfcl_eval's generate_leaderboard_csv) and their weights in the overall score.
SIMPLE = ("simple_python", "simple_java", "simple_javascript")
NON_LIVE = ("multiple", "parallel", "parallel_multiple")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
IRRELEVANCE = ("irrelevance", "live_irrelevance")
MULTI_TURN = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
WEB_SEARCH = ("web_search_base", "web_search_no_snippet")  # need a search service: not run here
MEMORY = ("memory_kv", "memory_vector", "memory_rec_sum")  # need bfcl's memory prerequisites: not run here
WEIGHTS = {"non_live": 10, "live": 10, "irrelevance": 10, "multi_turn": 30, "agentic": 40}


def bfcl_scores(categories: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Group and overall scores from a summary's per-category results (accuracy over answered items),
    as fractions: `accuracy` the leaderboard's (a category not run counts 0), `accuracy_run` the same
    aggregation over the categories that were run only (None when a group has none), `missing` the
    categories a group lacks."""
    groups = {
        "non_live": [[*SIMPLE], *NON_LIVE],
        "live": [*LIVE],
        "irrelevance": [*IRRELEVANCE],
        "multi_turn": [*MULTI_TURN],
        "agentic": [[*WEB_SEARCH], [*MEMORY]],
    }
    full = _aggregate(categories, groups, skip_missing=False)
    run = _aggregate(categories, groups, skip_missing=True)
    return {"groups": {g: {"accuracy": full[g]["accuracy"], "accuracy_run": run[g]["accuracy"] if run[g] else None,
                           "missing": full[g]["missing"]} for g in groups},
            "overall": {"accuracy": full["overall"]["accuracy"],
                        "accuracy_run": run["overall"]["accuracy"] if run["overall"] else None,
                        "missing": full["overall"]["missing"]},
            "weights": WEIGHTS}


def _aggregate(categories: dict[str, dict[str, Any]], groups: dict[str, list[Any]],
               skip_missing: bool) -> dict[str, dict[str, Any] | None]:
    """Each group and the overall with bfcl_eval's helpers; with skip_missing, parts not run are left
    out of every mean (None: nothing of it was run)."""
    from fcdistill.bfcl_env import bfcl_import

    helper = bfcl_import("bfcl_eval.eval_checker.eval_runner_helper")

    def cat(name: str) -> dict[str, Any] | None:
        c = categories.get(name) or {}
        if c.get("answered"):
            return {"accuracy": c["accuracy"], "total_count": c["answered"], "display_accuracy": c["accuracy"],
                    "missing": []}
        if skip_missing:
            return None
        return {"accuracy": 0.0, "total_count": 0, "display_accuracy": "N/A", "missing": [name]}

    def mean(names: list[Any], how: str = "unweighted") -> dict[str, Any] | None:
        parts = [p for p in (mean(n) if isinstance(n, list) else cat(n) for n in names) if p is not None]
        if not parts:
            return None
        if how == "weighted" and any(p["total_count"] for p in parts):
            out = helper.calculate_weighted_accuracy(parts, display_na_if_category_missing=False)
        elif how == "weighted":
            out = {"accuracy": 0.0, "total_count": 0}
        else:
            out = helper.calculate_unweighted_accuracy(parts, display_na_if_category_missing=False)
        return {"accuracy": out["accuracy"], "total_count": out["total_count"], "display_accuracy": out["accuracy"],
                "missing": [m for p in parts for m in p["missing"]]}

    result: dict[str, dict[str, Any] | None] = {
        g: mean(names, "weighted" if g == "live" else "unweighted") for g, names in groups.items()}
    present = [(result[g], WEIGHTS[g]) for g in groups if result[g] is not None]
    overall = None
    if present:
        o = helper.calculate_percentage_weighted_accuracy([p for p, _ in present], [w for _, w in present],
                                                          display_na_if_category_missing=False)
        overall = {"accuracy": o["accuracy"], "missing": [m for p, _ in present for m in p["missing"]]}
    result["overall"] = overall
    return result


def markdown(scores: dict[str, Any]) -> list[str]:
    """The leaderboard-style lines of a report."""
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f}%"

    lines = ["", "BFCL groups, aggregated as its leaderboard does: *leaderboard* counts a category not run as 0, "
                 "*over what ran* leaves it out.", "",
             "| group (weight) | leaderboard | over what ran | not run |", "|---|---:|---:|---|"]
    for name, g in scores["groups"].items():
        lines.append(f"| {name} ({scores['weights'][name]}) | {pct(g['accuracy'])} | {pct(g['accuracy_run'])} | "
                     f"{', '.join(g['missing']) or '—'} |")
    o = scores["overall"]
    lines.append(f"| **overall** | **{pct(o['accuracy'])}** | **{pct(o['accuracy_run'])}** | "
                 f"{len(o['missing'])} categories |")
    return lines
