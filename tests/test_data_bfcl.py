"""BFCL data stage: canonical targets, seeded splits without leakage, manifests, exports, CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fcdistill.data.bfcl import SplitOptions, canonical_calls, prepare_bfcl, read_records
from fcdistill.data.export import EXPORT_FORMATS, export_split
from fcdistill.tools import ToolCall

CATS = "simple_python,multiple,parallel,irrelevance,live_simple,live_irrelevance,live_relevance"


def _prepare(out: Path, seed: int = 7) -> None:
    opts = SplitOptions(categories=CATS.split(","), seed=seed,
                        max_per_category={"live_simple": 20, "live_irrelevance": 20})
    prepare_bfcl(opts, out)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm2_dir):
    a, b, c = (tmp_path_factory.mktemp(n) for n in "abc")
    _prepare(a)
    _prepare(b)
    _prepare(c, seed=8)
    for d in (a, b):
        for fmt in EXPORT_FORMATS:
            export_split(d, "train", fmt, None, labels="ground-truth")
            if fmt != "trl":
                export_split(d, "eval", fmt, None)
    return a, b, c


def test_canonical_calls_take_first_value_and_omit_optional():
    gt = [{"f": {"a": [5, 6], "b": ["", "x"], "c": [{"k": ["v", "w"], "opt": [""]}], "d": [[1, 2]]}}]
    assert canonical_calls(gt) == [ToolCall(name="f", arguments={"a": 5, "c": {"k": "v"}, "d": [1, 2]})]
    docs = [{"name": "X.y", "parameters": {"properties": {"n": {"type": "int"}, "big": {"type": "long"}}}}]
    assert canonical_calls([{"X.y": {"flag": [True], "n": [3], "big": [1500]}}], "java", docs) == [
        ToolCall(name="X.y", arguments={"flag": "true", "n": "3", "big": "1500L"})]


def test_stated_keeps_an_optional_value_only_where_the_question_says_it():
    from fcdistill.data.bfcl import stated_in

    q = "Convert 10,000 USD to euros in metric units, rounding to 2 places; include NASDAQ and nyse."
    assert [stated_in(v, q) for v in ("usd", "metric", "NASDAQ", 10000, 2, 2.0, ["nasdaq", "NYSE"])] == [True] * 7
    # not a whole word, not said, or not the kind of value a question says
    assert [stated_in(v, q) for v in ("c", "all", "euro", 0, 1000, 10.5, True, None, [], {"a": 1})] == [False] * 10
    assert not stated_in(5, "a 5.5 kg box") and stated_in(5, "5 boxes.") and stated_in(0.05, "at alpha 0.05")
    assert not stated_in(10, "10,000 units") and not stated_in(500, "1,500 m") and stated_in(10, "10, 20 and 30")
    gt = [{"f": {"unit": ["metric", ""], "region": ["all", ""], "year": [2023, ""], "n": [3, ""], "fmt": ["json", ""],
                 "full": [True, ""], "opt": [""]}}]
    docs = [{"name": "f", "parameters": {"properties": {}, "required": ["fmt"]}}]
    calls = canonical_calls(gt, "python", docs, optional="stated", question="Show 3 results in Metric.")
    # the schema requires `fmt`: kept as given, though unsaid
    assert calls == [ToolCall(name="f", arguments={"unit": "metric", "n": 3, "fmt": "json"})]


def test_given_optional_values_are_kept_and_fail_bfcls_checker_less_often(tmp_path):
    """optional_args="given" keeps an optional parameter's listed value and omits only a bare `[""]`;
    "stated" keeps it only where the question says it, so it lies between the two.
    Judged by bfcl_eval's checker, the default targets fail where BFCL lists `""` for a parameter the
    function requires (e.g. simple_python_17's `formatted`); the kept values fail less often. A target
    the checker rejects is a label error of its record."""
    from fcdistill.eval.dataset import load_eval_set
    from fcdistill.eval.score import Scorer

    gt = [{"f": {"a": [5, 6], "b": ["", "x"], "u": ["km/h", ""], "c": [{"k": ["v", "w"], "opt": [""]}]}}]
    assert canonical_calls(gt, optional="given") == [
        ToolCall(name="f", arguments={"a": 5, "b": "x", "u": "km/h", "c": {"k": "v"}})]
    cats = ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple"]
    args, failed = {}, {}
    scorer = Scorer()
    for mode in ("omit", "given", "stated"):
        prepare_bfcl(SplitOptions(categories=cats, seed=3, optional_args=mode), tmp_path / mode)
        _, _, items = load_eval_set(tmp_path / mode / "manifest.json", cats, None)
        failed[mode] = set()
        for it in items:
            calls = it.record.ground_truth
            output = {"id": it.id, "category": it.category, "mode": "fc", "content": None, "finish_reason": "tool_calls",
                      "tool_calls": [{"name": c.name, "arguments": json.dumps(c.arguments)} for c in calls]}
            if not scorer.score(it, output).valid:
                failed[mode].add(it.id)
            args[mode, it.id] = sum(len(c.arguments) for c in calls)
        # each of those targets fails its own schema too: it carries a label error and is never trained on
        flagged = {r.id for r in read_records(tmp_path / mode, "eval") if r.label_errors}
        assert failed[mode] <= flagged, (mode, failed[mode] - flagged)
    ids = {i for _, i in args}
    assert all(args["given", i] >= args["omit", i] for i in ids)
    assert sum(args["given", i] > args["omit", i] for i in ids) > 0.2 * len(ids)
    assert len(failed["given"]) < len(failed["omit"]) and len(failed["given"]) <= 0.01 * len(ids), failed
    assert all(args["omit", i] <= args["stated", i] <= args["given", i] for i in ids)
    assert 0 < sum(args["stated", i] < args["given", i] for i in ids) and failed["stated"] <= failed["omit"], failed
    manifest = json.loads((tmp_path / "given" / "manifest.json").read_text())
    assert manifest["options"]["optional_args"] == "given"


def test_same_seed_gives_byte_identical_outputs(prepared):
    a, b, c = prepared
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 4 + 7
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert json.loads((a / "manifest.json").read_text())["splits"] != json.loads((c / "manifest.json").read_text())["splits"]


def test_split_is_stratified_and_live_is_eval_only(prepared):
    a, _, _ = prepared
    manifest = json.loads((a / "manifest.json").read_text())
    counts = manifest["counts"]
    sp = counts["simple_python"]
    assert sp["eval"] == 200 and sp["train"] + sp["dropped_eval_overlap"] == 200 and sp["mix_in"] <= 20
    assert counts["irrelevance"]["train"] + counts["irrelevance"]["dropped_eval_overlap"] == 120
    for live in ("live_simple", "live_irrelevance", "live_relevance"):
        assert counts[live]["train"] == 0 and counts[live]["eval"] > 0
    assert manifest["bfcl_eval_version"]
    assert all(len(h) == 64 for h in manifest["source_files"].values())
    assert "possible_answer/BFCL_v4_simple_python.json" in manifest["source_files"]
    train = read_records(a, "train")
    assert sum(r.label_source == "ground_truth" for r in train) == len(manifest["mix_in"])
    assert {r.label_source for r in train} == {"ground_truth", "teacher"}
    irrelevant = [r for r in train if r.category == "irrelevance"]
    assert all(r.target_content and r.ground_truth is None for r in irrelevant)
    relevance = [r for r in read_records(a, "eval") if r.category == "live_relevance"]
    assert relevance and all(not r.has_target for r in relevance)


def test_no_eval_id_reaches_any_training_file(prepared):
    a, _, _ = prepared
    manifest = json.loads((a / "manifest.json").read_text())
    eval_ids = set(manifest["splits"]["eval"])
    assert not eval_ids & set(manifest["splits"]["train"])
    ids_file = json.loads((a / "test_case_ids_to_generate.json").read_text())
    assert {i for ids in ids_file.values() for i in ids} == eval_ids
    train_text = "\n".join(p.read_text() for p in (a / "export").glob("train.*.jsonl"))
    assert train_text
    for eid in eval_ids:
        assert f'"{eid}"' not in train_text
    # no eval question reaches a training prompt, not even where BFCL repeats it under another category's id
    trl = [json.loads(line) for line in (a / "export" / "train.trl.jsonl").read_text().splitlines()]
    prompts = "\n".join(r["prompt"] for r in trl)
    for rec in read_records(a, "eval"):
        assert f"<|im_start|>user\n{rec.messages[-1]['content']}<|im_end|>" not in prompts, rec.id
    dropped = manifest["dropped_eval_overlap"]
    assert dropped and not set(dropped) & set(manifest["splits"]["train"])
    assert sum(c.get("dropped_eval_overlap", 0) for c in manifest["counts"].values()) == len(dropped)


def test_exports_have_each_formats_shape(prepared):
    a, _, _ = prepared
    exp = a / "export"
    trl = [json.loads(x) for x in (exp / "train.trl.jsonl").read_text().splitlines()]
    assert all(r["completion"].endswith("<|im_end|>") for r in trl)
    assert any(r["completion"].startswith("<tool_call>[") for r in trl)
    assert any(not r["completion"].startswith("<tool_call>") for r in trl)  # irrelevance: text
    oai = [json.loads(x) for x in (exp / "train.openai.jsonl").read_text().splitlines()]
    call = next(r for r in oai if r["messages"][-1].get("tool_calls"))
    assert call["tools"][0]["type"] == "function"
    json.loads(call["messages"][-1]["tool_calls"][0]["function"]["arguments"])
    bp = [json.loads(x) for x in (exp / "train.bedrock-prompt.jsonl").read_text().splitlines()]
    assert bp[0]["schemaVersion"] == "bedrock-conversation-2024"
    assert "[" in bp[0]["messages"][-1]["content"][0]["text"] and bp[0]["system"][0]["text"]
    bt = [json.loads(x) for x in (exp / "train.bedrock-toolconfig.jsonl").read_text().splitlines()]
    with_call = next(r for r in bt if "toolUse" in r["messages"][-1]["content"][0])
    assert with_call["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["type"] == "object"
    ev = [json.loads(x) for x in (exp / "eval.openai.jsonl").read_text().splitlines()]
    assert all(r["messages"][-1]["role"] == "user" for r in ev)  # eval exports carry no answers


def test_labeled_export_keeps_only_mix_in(tmp_path, prepared):
    a, _, _ = prepared
    path, n, skipped = export_split(a, "train", "openai", tmp_path / "x.jsonl", labels="labeled")
    manifest = json.loads((a / "manifest.json").read_text())
    assert n + skipped == len(manifest["splits"]["train"])
    assert n <= len(manifest["mix_in"]) and n > 0
    assert "awaits teacher labels" in path.with_suffix(".skipped.txt").read_text()


def _fcd(*args: str, env_extra: str = "") -> subprocess.CompletedProcess:
    code = env_extra + "from fcdistill.cli import app; import sys; sys.argv = ['fcd', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["data", "bfcl", "--categories", "simple_python,nonsense"], "unknown BFCL category 'nonsense'"),
    (["data", "bfcl", "--eval-fraction", "1.0"], "--eval-fraction: Input should be less than 1, not 1.0"),
    (["data", "bfcl", "--mix-in", "0"], "--mix-in: Input should be greater than 0, not 0.0"),
    (["data", "bfcl", "--categories", "web_search"], "unknown BFCL category 'web_search'"),
    (["data", "bfcl", "--optional-args", "bogus"], "--optional-args: Input should be 'omit', 'given' or 'stated', not 'bogus'"),
    (["data", "bfcl", "--eval-per-category", "live_simple=0"], "--eval-per-category: expected CATEGORY=N with N > 0"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    proc = _fcd(*args, "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "manifest.json").exists()


def test_cli_without_bfcl_eval_exits_2(tmp_path):
    hide = ("import sys, importlib.abc\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'bfcl_eval': raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Hide())\n")
    proc = _fcd("data", "bfcl", "--out", str(tmp_path), env_extra=hide)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bfcl_eval is not installed" in lines[0], proc.stderr


# -- exports that write nothing, stale side files, API-safe tool names; split warnings -----------------
def _small(out: Path, caps: dict[str, int], **kw) -> object:
    return prepare_bfcl(SplitOptions(categories=list(caps), max_per_category=caps, seed=3, **kw), out)


def test_an_export_that_would_write_nothing_fails_naming_the_fix(tmp_path):
    """4 train items a category: the 10% mix-in rounds to 0, so `--labels labeled` (the default) has
    nothing to export until `fcd label` ran. That is an error naming both ways out, from the CLI too,
    and no empty export is left for `fcd train` to find."""
    from fcdistill.data.bfcl import DataError

    d = tmp_path / "d"
    _small(d, {"simple_python": 8, "irrelevance": 8})
    out = tmp_path / "x.openai.jsonl"
    out.write_text('{"stale": true}\n')
    with pytest.raises(DataError) as err:
        export_split(d, "train", "openai", out)
    assert "--labels ground-truth" in str(err.value) and f"fcd label --data {d}" in str(err.value)
    assert not out.exists() and "awaits teacher labels" in (tmp_path / "x.openai.skipped.txt").read_text()
    proc = _fcd("data", "export", "--data", str(d), "--split", "train", "--format", "openai")
    assert proc.returncode == 2 and "--labels ground-truth" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_side_files_of_an_earlier_export_are_removed(tmp_path):
    d = tmp_path / "d"
    _small(d, {"simple_python": 40, "irrelevance": 40})
    out = tmp_path / "x.openai.jsonl"
    _, n, skipped = export_split(d, "train", "openai", out, labels="labeled")
    assert n > 0 and skipped > 0 and (tmp_path / "x.openai.skipped.txt").is_file()
    assert (tmp_path / "x.openai.tool_names.json").is_file()
    _, n, skipped = export_split(d, "train", "openai", out, labels="ground-truth", tool_names="keep")
    assert skipped == 0 and n > 0
    assert not (tmp_path / "x.openai.skipped.txt").exists()  # nothing skipped this time
    assert not (tmp_path / "x.openai.tool_names.json").exists()  # names kept this time


@pytest.mark.parametrize("fmt", ["openai", "bedrock-toolconfig"])
def test_exports_for_apis_use_safe_tool_names_with_a_mapping_back(tmp_path, fmt):
    """OpenAI and Bedrock accept tool names of letters, digits, `_` and `-` only; BFCL's are dotted
    (`math.factorial`). Those exports make the names safe in tools and targets alike, and the mapping
    written next to the export turns them back into BFCL's exactly."""
    import re

    d = tmp_path / "d"
    _small(d, {"simple_python": 40, "multiple": 40})
    out = tmp_path / f"x.{fmt}.jsonl"
    export_split(d, "train", fmt, out, labels="ground-truth")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    text = out.read_text()
    names = set(re.findall(r'"name": "([^"]+)"', text))
    assert names and all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", n) for n in names), sorted(names)[:5]
    back = json.loads((tmp_path / f"x.{fmt}.tool_names.json").read_text())["to_original"]
    records = {r.id: r for r in read_records(d, "train")}
    original = {t.name for r in records.values() for t in r.tools}
    assert any("." in n for n in original) and {back.get(n, n) for n in names} <= original
    first = rows[0]
    rec = records[first.get("id")] if "id" in first else None
    if rec is not None:  # openai rows carry the id: its tools map back one to one
        assert [back.get(t["function"]["name"], t["function"]["name"]) for t in first["tools"]] == [t.name for t in rec.tools]
    keep = tmp_path / f"k.{fmt}.jsonl"
    proc = _fcd("data", "export", "--data", str(d), "--split", "train", "--format", fmt, "--labels", "ground-truth",
                "--tool-names", "keep", "--out", str(keep))
    assert proc.returncode == 0, proc.stderr
    assert any("." in n for n in re.findall(r'"name": "([^"]+)"', keep.read_text()))
    assert not (tmp_path / f"k.{fmt}.tool_names.json").exists()


def test_split_warns_about_ignored_caps_and_an_empty_mix_in(tmp_path):
    result = _small(tmp_path / "a", {"simple_python": 8, "irrelevance": 8, "live_simple": 5})
    assert not any("ignored" in w for w in result.warnings)  # every capped category was read
    opts = SplitOptions(categories=["simple_python", "irrelevance"], seed=3,
                        max_per_category={"simple_python": 8, "irrelevance": 8, "live_simple": 5})
    result = prepare_bfcl(opts, tmp_path / "b")
    assert any("live_simple=5 ignored" in w for w in result.warnings), result.warnings
    assert any("mix-in is empty" in w and "fcd label" in w for w in result.warnings), result.warnings
    roomy = _small(tmp_path / "c", {"simple_python": 60, "irrelevance": 60})
    assert roomy.warnings == []
    proc = _fcd("data", "bfcl", "--out", str(tmp_path / "d"), "--categories", "simple_python",
                "--max-per-category", "simple_python=8,live_multiple=3")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --max-per-category live_multiple=3 ignored" in proc.stderr
    assert "warning: the mix-in is empty" in proc.stderr


def test_training_on_live_keeps_the_eval_items_of_the_eval_only_split(tmp_path):
    """--no-live-eval-only with --eval-per-category: live items beyond the eval count train, and the
    eval set is item for item the one an eval-only split with the same count as a cap holds, so runs
    that train on live data are scored on the same questions as runs that do not."""
    cats = ["simple_python", "live_simple", "live_multiple"]
    held = prepare_bfcl(SplitOptions(categories=cats, seed=3, max_per_category={"simple_python": 20,
                                     "live_simple": 12, "live_multiple": 10}), tmp_path / "held")
    assert held.counts["live_simple"]["train"] == 0 and held.counts["live_multiple"]["train"] == 0
    dropped = prepare_bfcl(SplitOptions(categories=["live_simple"], seed=3, eval_per_category={"live_simple": 5}),
                           tmp_path / "dropped")
    assert dropped.counts["live_simple"] == {**dropped.counts["live_simple"], "eval": 5, "train": 0}
    assert any("eval-only categories, so the items past the count are dropped" in w for w in dropped.warnings)
    opts = SplitOptions(categories=cats, seed=3, live_eval_only=False,
                        max_per_category={"simple_python": 20, "live_simple": 40, "live_multiple": 30},
                        eval_per_category={"live_simple": 12, "live_multiple": 10, "simple_python": 99})
    trained = prepare_bfcl(opts, tmp_path / "trained")
    assert [r.id for r in read_records(tmp_path / "trained", "eval") if r.category != "simple_python"] == \
        [r.id for r in read_records(tmp_path / "held", "eval") if r.category != "simple_python"]
    c = trained.counts
    assert c["live_simple"]["eval"] == 12 and c["live_simple"]["train"] + c["live_simple"]["dropped_eval_overlap"] == 28
    assert c["live_multiple"]["eval"] == 10 and c["live_multiple"]["train"] > 0
    assert c["simple_python"] == {**c["simple_python"], "eval": 20, "train": 0}  # all 20 capped items are eval
    assert any("--eval-per-category asks for more eval items than there are: simple_python (20 of 99)" in w
               for w in trained.warnings), trained.warnings
    train_ids = {r.id for r in read_records(tmp_path / "trained", "train")}
    assert train_ids and not train_ids & {r.id for r in read_records(tmp_path / "trained", "eval")}


def test_help_shows_defaults_whole_when_not_a_terminal():
    proc = subprocess.run([sys.executable, "-m", "fcdistill", "data", "bfcl", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "[default:" in proc.stdout and "simple_python,multiple,parallel,parallel_multiple,irrelevance]" in proc.stdout
    assert "…" not in proc.stdout
