"""reports/quality.{json,md}: how good the student is, against the quality issue's targets.

Puts in one place what decides the training recipe: BFCL accuracy with counts and Wilson CI95 for
base, ground-truth-only and augmented students (every later run paired item by item with the first,
McNemar p), the targets met or missed, the ablations, the `fcd data augment` stats, a contamination
report of the train file actually trained on against the eval split (eval ids and long n-gram
overlaps, the same check the data stages apply), the everyday-tools check outside BFCL, and
train_bench's throughput. Every figure is read from the run directories and result files named on
the command line; nothing is typed in.

Usage:
  .venv/bin/python benchmarks/quality_report.py \
      --run base=runs/quality-aug/eval/base --run gt-only=runs/quality-gt/eval/tuned \
      --run augmented=runs/quality-aug/eval/tuned \
      [--ablation "no masking=runs/abl-nomask/eval/tuned" ...] \
      [--ablation "gt-only>optional args given=runs/quality-gt-given/eval/tuned" ...] \
      --data runs/quality-aug/data --train-file runs/quality-aug/data-aug/train.jsonl \
      --augment-stats runs/quality-aug/data-aug/augment_stats.json \
      [--everyday reports/everyday_tools.json] [--train-bench benchmarks/results/train_bench.json] \
      [--note "free text shown under the title"] --out reports/quality
  A later report that adds runs to an earlier one whose eval dirs are gone:
      --keep reports/quality.json --run "augmented+live=runs/quality-live/eval/tuned" ...
  (the kept runs and ablations stay as recorded; every run records its per-item outcomes, so a kept
  run that has them is paired with the new ones.)
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The quality issue's targets (percent); the project's goal stays simple_python 80 / live_simple 60.
TARGETS = {"simple_python": 70, "multiple": 70, "parallel": 50, "irrelevance": 85,
           "live_simple": 35, "live_multiple": 30, "live_irrelevance": 70}


def _pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"error: expected NAME=PATH, got {text!r}")
    return name, Path(path)


def contamination(data_dir: Path, train_file: Path) -> dict[str, Any]:
    """Every train record (its own id and its source ids) and its question against the eval split."""
    from fcdistill.data.bfcl import eval_index
    from fcdistill.data.dedup import question_text

    index = eval_index(data_dir)
    flagged_ids, flagged_overlap = [], []
    n = 0
    for line in train_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        n += 1
        why = index.check([rec["id"], *rec.get("source_ids", [])], question_text(rec.get("messages", [])))
        if why is None:
            continue
        (flagged_ids if why.startswith("id ") else flagged_overlap).append({"id": rec["id"], "why": why})
    return {"train_file": str(train_file), "eval_dir": str(data_dir), "train_records": n,
            "eval_items": len(index.ids), "ngram": index.n, "eval_ids_in_train": len(flagged_ids),
            "flagged_overlaps": len(flagged_overlap), "flagged": (flagged_ids + flagged_overlap)[:50]}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _cell(cat: dict[str, Any] | None) -> str:
    if not cat or cat.get("accuracy") is None:
        return "—"
    lo, hi = cat["ci95"]
    return f"{_pct(cat['accuracy'])} ({cat['correct']}/{cat['answered']}; {_pct(lo)}–{_pct(hi)})"


def accuracy_table(data: dict[str, Any]) -> list[str]:
    runs = data["runs"]
    lines = ["| category | target | " + " | ".join(r["label"] for r in runs) + " |",
             "|---|---:|" + "---:|" * len(runs)]
    for c in data["categories"]:
        cells = []
        for r in runs:
            cat = r["categories"].get(c)
            cell = _cell(cat)
            target = TARGETS.get(c)
            if target is not None and cat and cat.get("accuracy") is not None:
                cell += " ✓" if 100 * cat["accuracy"] >= target else " ✗"
            vs = (r.get("vs_first") or {}).get(c)
            if vs and vs["paired"]:
                cell += f" [+{vs['gained']}/−{vs['lost']}, p={vs['p_mcnemar']:.2g}]"
            cells.append(cell)
        target = f"≥ {TARGETS[c]}" if c in TARGETS else ""
        lines.append(f"| {c} | {target} | " + " | ".join(cells) + " |")
    lines.append("| **overall** (mean of categories) | | " + " | ".join(
        f"**{_pct(r['overall']['accuracy'])}**" for r in runs) + " |")
    return lines


def augment_table(stats: dict[str, Any]) -> list[str]:
    lines = ["| transform | records in | out | rejected (reasons) | not applicable | out categories |",
             "|---|---:|---:|---|---|---|"]
    for name, s in stats.items():
        if not isinstance(s, dict) or "in" not in s:
            continue
        rejected = s.get("rejected", {})
        reasons = ", ".join(f"{k} {v}" for k, v in rejected.items()) or "—"
        na = ", ".join(f"{k} {v}" for k, v in s.get("not_applicable", {}).items()) or "—"
        cats = ", ".join(f"{k} {v}" for k, v in s.get("out_categories", {}).items()) or "—"
        lines.append(f"| {name} | {s['in']} | {s['out']} | {sum(rejected.values())} ({reasons}) | {na} | {cats} |")
    return lines


def everyday_table(result: dict[str, Any]) -> list[str]:
    lines = ["| model | right tool | every key argument right | no call when no tool fits |", "|---|---:|---:|---:|"]
    for name, m in result["models"].items():
        s = m["summary"]
        lines.append(f"| {name} | {s['tool_right']}/{s['tool_requests']} | {s['args_right']}/{s['tool_requests']} | "
                     f"{s['no_call_right']}/{s['no_tool_requests']} |")
    return lines


def train_bench_table(result: dict[str, Any]) -> list[str]:
    lines = ["| variant | precision | tokens/s | peak RSS (GB) | eval loss |", "|---|---|---:|---:|---:|"]
    for v in result.get("variants", result.get("cpu", {}).get("variants", [])):
        lines.append(f"| {v['name']} | {v.get('precision', '')} | {v['train_tokens_per_second']} | "
                     f"{v.get('peak_rss_gb', '')} | {v.get('eval_loss', float('nan')):.4f} |")
    return lines


def pair_with(ref: dict[str, Any], entry: dict[str, Any], categories: list[str]) -> dict[str, Any] | None:
    """`entry` against `ref` item by item (both need recorded outcomes): gained, lost, exact McNemar p."""
    from fcdistill.eval.report import mcnemar_p

    a, b = ref.get("items"), entry.get("items")
    if not a or not b:
        return None
    cats = {i: c for c in categories for i in (entry.get("item_categories") or {}).get(c, [])}
    out: dict[str, Any] = {}
    for c in categories:
        ids = [i for i in b if cats.get(i) == c and i in a]
        gained = sum(b[i] and not a[i] for i in ids)
        lost = sum(a[i] and not b[i] for i in ids)
        out[c] = {"paired": len(ids), "gained": gained, "lost": lost, "p_mcnemar": mcnemar_p(gained, lost)}
    return out


def with_outcomes(cmp: dict[str, Any], dirs: list[Path]) -> dict[str, Any]:
    """Record each run's per-item outcomes (and their categories) so later reports can pair with it."""
    from fcdistill.eval.report import _load_run

    for entry, d in zip(cmp["runs"], dirs):
        loaded = _load_run(d)[1]
        entry["items"] = {i: ok for i, (_, ok) in loaded.items()}
        cats: dict[str, list[str]] = {}
        for i, (c, _) in loaded.items():
            cats.setdefault(c, []).append(i)
        entry["item_categories"] = cats
    return cmp


def labelled_comparison(named_runs: list[tuple[str, Path]]) -> dict[str, Any]:
    """compare_data over the runs, each labelled with its given name and carrying its per-item outcomes."""
    from fcdistill.eval.report import compare_data

    paths = [p for _, p in named_runs]
    cmp = with_outcomes(compare_data(paths), paths)
    for entry, (name, _) in zip(cmp["runs"], named_runs):
        entry["label"] = name
    return cmp


def on_items(entry: dict[str, Any], ids_by_category: dict[str, list[str]], label: str) -> dict[str, Any]:
    """A kept run's accuracy recomputed from its recorded outcomes over the given items only: a run
    evaluated on a sample of the eval split is then set against it on the same items."""
    from fcdistill.eval.report import wilson

    missing = [i for ids in ids_by_category.values() for i in ids if i not in entry["items"]]
    if missing:
        raise SystemExit(f"error: {entry['label']} has no recorded outcome for {len(missing)} of the items to compare "
                         f"(e.g. {missing[0]}); pair with a run that answered all of them")
    items = {i: entry["items"][i] for ids in ids_by_category.values() for i in ids}
    cats: dict[str, Any] = {}
    for c, ids in ids_by_category.items():
        mine = [items[i] for i in ids]
        ci = wilson(sum(mine), len(mine))
        cats[c] = {"answered": len(mine), "correct": sum(mine), "accuracy": sum(mine) / len(mine) if mine else None,
                   "ci95": list(ci) if ci else None}
    accs = [c["accuracy"] for c in cats.values() if c["accuracy"] is not None]
    return {"label": label, "dir": entry.get("dir"), "overall": {"accuracy": sum(accs) / len(accs) if accs else None},
            "categories": cats, "items": items, "item_categories": ids_by_category}


def against_kept(ref: dict[str, Any], abl: list[tuple[str, Path]]) -> dict[str, Any]:
    """Ablations of a kept run (one with recorded outcomes), compared on the items they answered."""
    new = labelled_comparison(abl)
    ids: dict[str, list[str]] = {}
    for entry in new["runs"]:
        for c, its in entry["item_categories"].items():
            ids[c] = list(dict.fromkeys([*ids.get(c, []), *its]))
    base = on_items(ref, ids, f"{ref['label']} (same items)")
    categories = [c for c in new["categories"] if c in ids]
    for entry in new["runs"]:
        entry["vs_first"] = pair_with(base, entry, categories)
    return {"categories": categories, "runs": [base, *new["runs"]], "baseline": base["label"],
            "shared_categories": categories}


def keep_runs(kept: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The kept report's held-out runs first, as recorded, then the new runs; a new run is paired with
    the kept baseline when that has recorded outcomes, else (as compare_data does) with the first new run."""
    old = kept["held_out"]
    categories = list(dict.fromkeys([*old["categories"], *new["categories"]]))
    ref = old["runs"][0] if old["runs"][0].get("items") else None
    for entry in new["runs"]:
        if ref is not None:
            entry["vs_first"] = pair_with(ref, entry, categories)
    baseline = old["baseline"] if ref is not None else f"{old['baseline']} (kept runs, as recorded) / {new['baseline']}"
    return {"categories": categories, "runs": [*old["runs"], *new["runs"]], "baseline": baseline,
            "shared_categories": [c for c in categories if c in old["shared_categories"] or c in new["categories"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], required=True,
                    help="NAME=EVAL_RUN_DIR (an `fcd eval run` output); the first is the baseline")
    ap.add_argument("--ablation", action="append", default=[],
                    help="NAME=EVAL_RUN_DIR, compared with the last --run; RUN>NAME=EVAL_RUN_DIR compares it with the "
                         "--run named RUN (one lever moved from that run), or with a run kept by --keep that recorded "
                         "its outcomes, on the items the ablation answered (e.g. a sample of each category)")
    ap.add_argument("--data", type=Path, required=True, help="the data dir whose eval split was evaluated")
    ap.add_argument("--train-file", type=Path, required=True, help="the train records trained on (contamination)")
    ap.add_argument("--augment-stats", type=Path)
    ap.add_argument("--everyday", type=Path, action="append", default=[],
                    help="a benchmarks/everyday_tools.py result; repeatable (their models side by side)")
    ap.add_argument("--train-bench", type=Path)
    ap.add_argument("--note", default="")
    ap.add_argument("--keep", type=Path, help="an earlier quality.json whose runs and ablations stay, as recorded")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "quality")
    args = ap.parse_args()

    runs = [_pair(r) for r in args.run]
    main_cmp = labelled_comparison(runs)
    kept = json.loads(args.keep.read_text(encoding="utf-8")) if args.keep else None
    pairing = f"runs after the first paired item by item with {runs[0][0]} (+gained/−lost, exact McNemar p)"
    if kept is not None:
        main_cmp = keep_runs(kept, main_cmp)
        if main_cmp["runs"][0].get("items"):
            pairing = f"runs paired item by item with {main_cmp['baseline']} (+gained/−lost, exact McNemar p)"
        else:
            old_runs = kept["held_out"]["runs"]
            paired = [r["label"] for r in old_runs[1:] if r.get("vs_first")]
            unpaired = [r["label"] for r in old_runs[1:] if not r.get("vs_first")]
            then = "; ".join(x for x in (f"{', '.join(paired)} paired with {old_runs[0]['label']}" if paired else "",
                                         f"{', '.join(unpaired)} unpaired" if unpaired else "") if x)
            added = (f"{', '.join(n for n, _ in runs[1:])}, added here, paired item by item with {runs[0][0]}"
                     if len(runs) > 1 else f"{runs[0][0]}, added here, unpaired")
            pairing = (f"{', '.join(r['label'] for r in old_runs)} kept from `{args.keep}` as recorded (their eval "
                       f"outputs are gone; {then or 'as then'}); {added}")
    report: dict[str, Any] = {"created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "command": " ".join(sys.argv), "targets": TARGETS, "held_out": main_cmp}
    md = ["# Student quality", "", args.note, "" if args.note else "",
          "## Held-out BFCL (never trained on)", "",
          f"Accuracy % (correct/answered; Wilson CI95); ✓/✗ against the target; {pairing}.", "",
          *accuracy_table(main_cmp), ""]
    kept_ablations = (kept or {}).get("ablations") or {}
    if kept_ablations:
        report["ablations"] = dict(kept_ablations)
        md += ["## Ablations", ""]
        for ref_name, abl_cmp in kept_ablations.items():
            md += [f"Against {ref_name}, item by item (kept as recorded).", "", *accuracy_table(abl_cmp), ""]
    if args.ablation:
        groups: dict[str, list[tuple[str, Path]]] = {}  # the run an ablation moves one lever of -> its ablations
        named = dict(runs)
        recorded = {r["label"]: r for r in (kept or {}).get("held_out", {}).get("runs", []) if r.get("items")}
        for text in args.ablation:
            base, sep, rest = text.partition(">")
            base, rest = (base, rest) if sep and "=" not in base else (runs[-1][0], text)
            if base not in named and base not in recorded:
                raise SystemExit(f"error: --ablation {text!r}: no --run, and no kept run with recorded outcomes, "
                                 f"named {base!r}")
            groups.setdefault(base, []).append(_pair(rest))
        if not kept_ablations:
            report["ablations"] = {}
            md += ["## Ablations", ""]
        for ref_name, abl in groups.items():
            if ref_name in named:
                abl_cmp = labelled_comparison([(ref_name, named[ref_name]), *abl])
                intro = f"Against {ref_name}, item by item."
                key = ref_name
            else:
                abl_cmp = against_kept(recorded[ref_name], abl)
                intro = (f"Against {ref_name} (kept, its recorded outcomes) on the items the ablation answered, "
                         "item by item.")
                key = f"{ref_name} (kept outcomes)"  # not to replace a kept ablation group of the same run
            report["ablations"][key] = abl_cmp
            md += [intro, "", *accuracy_table(abl_cmp), ""]
    if args.augment_stats or (kept or {}).get("augment_stats"):
        if args.augment_stats:
            stats, source = json.loads(args.augment_stats.read_text()), f"From `{args.augment_stats}`."
            report["augment_stats_source"] = str(args.augment_stats)
        else:  # a run added without its own stats (an ablation of the augment stage) leaves the recorded ones
            stats = kept["augment_stats"]
            origin = kept.get("augment_stats_source") or "the augment stats its command names"
            source = f"Kept from `{args.keep}` as recorded ({origin})."
            report["augment_stats_source"] = origin
        report["augment_stats"] = stats
        md += ["## `fcd data augment`", "", source, "", *augment_table(stats), ""]
    cont = contamination(args.data, args.train_file)
    report["contamination"] = cont
    md += ["## Contamination", "",
           f"{cont['train_records']} train records of `{cont['train_file']}` (own and source ids, user turns) against "
           f"the {cont['eval_items']} eval items of `{cont['eval_dir']}`: **{cont['eval_ids_in_train']} eval ids**, "
           f"**{cont['flagged_overlaps']} flagged overlaps** (a shared {cont['ngram']}-word span, or a whole short "
           "question).", ""]
    if args.everyday:
        models: dict[str, Any] = {}
        for path in args.everyday:
            models.update(json.loads(path.read_text())["models"])
        report["everyday_tools"] = {k: v["summary"] for k, v in models.items()}
        files = ", ".join(f"`{p}`" for p in args.everyday)
        md += ["## Everyday tools (outside BFCL)", "", f"From {files} (benchmarks/everyday_tools.py).", "",
               *everyday_table({"models": models}), ""]
    if args.train_bench:
        bench = json.loads(args.train_bench.read_text())
        report["train_bench"] = bench
        md += ["## Training throughput (benchmarks/train_bench.py, one run)", "", *train_bench_table(bench), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text("\n".join(md).replace("\n\n\n", "\n\n") + "\n", encoding="utf-8")
    print("\n".join(md))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
