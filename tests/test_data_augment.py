"""`fcd data augment`: determinism, each transform's invariants, no contamination, stats, a trainable export."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fcdistill.chat_format import ChatFormat
from fcdistill.data.augment import AugmentOptions, run_augment
from fcdistill.data.augment_names import (NOUNS, QUALIFIERS, VERBS, name_words, property_names, rename_schema,
                                          rename_value)
from fcdistill.data.augment_ops import NotApplicable, Pools, copies_an_example, mask, substitute
from fcdistill.data.augment_values import find_once, leaves, occurs
from fcdistill.data.bfcl import IRRELEVANT_ANSWER, Record, SplitOptions, eval_index, prepare_bfcl, read_records
from fcdistill.data.checks import format_failures
from fcdistill.data.dedup import DuplicateIndex
from fcdistill.tools import ToolCall, ToolSpec, call_errors

CATS = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "simple_java", "simple_javascript"]
WORDS = set(VERBS) | set(NOUNS) | set(QUALIFIERS)


def _fcd(*args: str, seed_env: str = "0") -> subprocess.CompletedProcess:
    code = "from fcdistill.cli import app; import sys; sys.argv = ['fcd', *sys.argv[1:]]; app()"
    env = {**os.environ, "PYTHONHASHSEED": seed_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A small BFCL split (30 train items a category, Java and JavaScript included)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BFCL_PROJECT_ROOT", str(tmp_path_factory.mktemp("bfcl-root")))
    out = tmp_path_factory.mktemp("src")
    prepare_bfcl(SplitOptions(categories=CATS, seed=5, max_per_category={c: 60 for c in CATS}), out)
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def runs(src, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The same seed twice through the CLI, in processes with different hash seeds; another seed once."""
    a, b, c = (tmp_path_factory.mktemp(n) for n in ("aug-a", "aug-b", "aug-c"))
    for out, seed, hseed in ((a, "3", "1"), (b, "3", "2"), (c, "4", "1")):
        proc = _fcd("data", "augment", "--data", str(src), "--out", str(out), "--seed", seed, "--no-progress",
                    seed_env=hseed)
        assert proc.returncode == 0, proc.stderr
        assert "fcd data augment" in proc.stdout and "substitute" in proc.stdout  # the rich table
    return a, b, c


def _records(d: Path) -> list[Record]:
    return read_records(d, "train")


def _augmented(d: Path, transform: str) -> list[Record]:
    return [r for r in _records(d) if r.transforms and f"-aug-{transform}-" in r.id]


def _by_id(d: Path) -> dict[str, Record]:
    return {r.id: r for r in _records(d)}


def _calls_json(calls: list[ToolCall] | None) -> list[str]:
    return [json.dumps(c.model_dump(), sort_keys=True) for c in calls or []]


def test_same_seed_gives_byte_identical_files(runs):
    a, b, c = runs
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"train.jsonl", "eval.jsonl", "manifest.json", "augment_stats.json",
                                       "test_case_ids_to_generate.json"}
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


def test_layout_manifest_and_provenance(src, runs):
    a, _, _ = runs
    assert (a / "eval.jsonl").read_bytes() == (src / "eval.jsonl").read_bytes()
    records = _records(a)
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids))
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["splits"]["train"] == ids
    assert manifest["mix_in"] == [r.id for r in records if r.label_source == "ground_truth"]
    aug = manifest["augment"]
    assert aug["options"]["seed"] == 3 and aug["options"]["multiplier"] == 2
    assert set(aug["source_files"]) == {"manifest.json", "train.jsonl", "eval.jsonl"}
    source = {r.id: r for r in read_records(src, "train")}
    originals = [r for r in records if not r.transforms]
    assert [r.id for r in originals] == [i for i in source if i not in aug["dropped_originals"]]
    assert all(r == source[r.id] for r in originals)  # originals pass through unchanged
    augmented = [r for r in records if r.transforms]
    assert len(augmented) > len(originals) // 2
    for r in augmented:
        assert r.split == "train" and r.source_ids and set(r.source_ids) <= set(source)
        first_step = r.id.split("-aug-")[1].rsplit("-", 1)[0]
        assert re.fullmatch(rf"{re.escape(r.source_ids[0])}-aug-{first_step}-\d+", r.id)
        assert r.transforms[-1] == first_step or r.transforms[0] == first_step
        assert r.has_target and not r.label_errors and r.possible_answer is None
        mixin = all(source[s].label_source == "ground_truth" for s in r.source_ids)
        assert r.label_source == ("ground_truth" if mixin else "teacher")
    assert {r.id.split("-aug-")[1].rsplit("-", 1)[0] for r in augmented} == {
        "mask", "shuffle", "distract", "compose", "delete", "substitute"}


def test_stats_add_up(runs):
    a, _, _ = runs
    stats = json.loads((a / "augment_stats.json").read_text())
    records = _records(a)
    assert sum(s["out"] for s in stats.values()) == len(records)
    for name, s in stats.items():
        assert s["in"] == s["out"] + sum(s["not_applicable"].values()) + sum(s["rejected"].values()), name
        assert s["consistent"] and sum(s["out_categories"].values()) == s["out"]
    assert stats["original"]["out"] == sum(not r.transforms for r in records)
    for name in ("mask", "shuffle", "distract", "compose", "delete", "substitute"):
        assert stats[name]["out"] == len(_augmented(a, name)), name
        assert stats[name]["out"] > 0
    assert stats["shuffle"]["not_applicable"].get("one_tool", 0) > 0


def test_every_record_passes_format_and_schema(runs):
    from fcdistill.data.checks import category_style, style_failures

    a, _, _ = runs
    for r in _records(a):
        if not r.transforms:
            continue
        assert len({t.name for t in r.tools}) == len(r.tools) >= 1
        calls = r.ground_truth or []
        assert not format_failures(calls, r.tools), r.id
        assert not style_failures(calls, category_style(r.category)), r.id


def test_mask_renames_consistently(src, runs):
    a, _, _ = runs
    source = _by_id(src)
    masked = _augmented(a, "mask")
    assert sum(r.ground_truth is not None for r in masked) > len(masked) // 2
    for r in masked:
        s = source[r.source_ids[0]]
        assert r.transforms == ["mask"]
        assert not {t.name for t in r.tools} & {t.name for t in s.tools}
        assert [t.description for t in r.tools] == [t.description for t in s.tools]  # descriptions stay
        for t in r.tools:  # plausible identifiers from the word lists, not gibberish
            parts = re.split(r"[._]|(?<=[a-z])(?=[A-Z])", t.name)
            assert all(p.lower() in WORDS for p in parts), t.name
            assert set(t.parameters.get("required", [])) <= set(t.parameters["properties"])
        old_words = {w for t in s.tools for n in [t.name, *property_names(t.parameters)] for w in name_words(n)}
        for t, old in zip(r.tools, s.tools):  # no new name reuses a word of an old one (`base` for height)
            assert not {w for n in [t.name, *property_names(t.parameters)] for w in name_words(n)} & old_words
            assert len(t.parameters["properties"]) == len(old.parameters["properties"])
            if old.parameters["properties"]:
                assert not set(t.parameters["properties"]) & set(old.parameters["properties"])
        if s.ground_truth is None:
            assert r.target_content == s.target_content
            continue
        names = {o.name: n.name for o, n in zip(s.tools, r.tools)}
        assert [c.name for c in r.ground_truth] == [names[c.name] for c in s.ground_truth]
        tools = {t.name: t for t in r.tools}
        for new, old in zip(r.ground_truth, s.ground_truth):
            assert not call_errors(new, r.tools), r.id  # validates against the masked schema
            assert sorted(map(repr, (v for v, _, _ in leaves(new.arguments, None)))) == \
                sorted(map(repr, (v for v, _, _ in leaves(old.arguments, None))))
            # the same parameter (told apart by its description, which stays) carries the same value
            by_desc = {p.get("description"): k for k, p in tools[new.name].parameters["properties"].items()}
            old_props = next(t for t in s.tools if t.name == old.name).parameters["properties"]
            for k, v in old.arguments.items():
                if not isinstance(v, (dict, list)) and list(by_desc).count(old_props[k].get("description")) == 1:
                    assert new.arguments[by_desc[old_props[k].get("description")]] == v


def test_mask_renames_nested_properties_and_the_query():
    tool = ToolSpec(name="database.query", description="Query a table.", parameters={
        "type": "object", "required": ["table", "conditions"], "properties": {
            "table": {"type": "string"},
            "conditions": {"type": "array", "items": {"type": "object", "required": ["field"], "properties": {
                "field": {"type": "string"}, "value": {"type": "string"}}}},
            "options": {"type": "object", "additionalProperties": {"type": "string"}}}})
    call = ToolCall(name="database.query", arguments={"table": "user", "conditions": [{"field": "age", "value": "25"}],
                                                      "options": {"field": "kept"}})
    rec = Record(id="simple_python_1", category="simple_python", split="train", label_source="teacher",
                 messages=[{"role": "user", "content": "Use database.query on table user where age is 25."}],
                 tools=[tool], ground_truth=[call])
    out = mask(rec, Pools.build([rec]), random.Random(0))
    new_tool, new_call = out.tools[0], out.ground_truth[0]
    props = new_tool.parameters["properties"]
    inner = next(p for p in props.values() if p.get("type") == "array")["items"]
    assert set(inner["required"]) <= set(inner["properties"]) and "field" not in inner["properties"]
    assert not call_errors(new_call, out.tools)
    free = next(v for v in new_call.arguments.values() if isinstance(v, dict))
    assert free == {"field": "kept"}  # a free-form dict keeps its own keys
    assert new_tool.name in out.messages[0]["content"] and "database.query" not in out.messages[0]["content"]
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    assert rename_value({"a": {"b": 1}}, schema, {"a": "x", "b": "y"}) == {"x": {"y": 1}}
    assert rename_schema(schema, {"a": "x", "b": "y"})["properties"]["x"]["properties"] == {"y": {"type": "integer"}}


def test_shuffle_and_distractors(src, runs):
    a, _, _ = runs
    source = _by_id(src)
    pool: dict[str, set[str]] = {}
    for rec in source.values():
        for t in rec.tools:
            pool.setdefault(json.dumps(t.model_dump(), sort_keys=True), set()).add(rec.id)
    for r in _augmented(a, "shuffle"):
        s = source[r.source_ids[0]]
        assert sorted(t.name for t in r.tools) == sorted(t.name for t in s.tools)
        assert [t.name for t in r.tools] != [t.name for t in s.tools]
        assert _calls_json(r.ground_truth) == _calls_json(s.ground_truth) and r.target_content == s.target_content
    distracted = _augmented(a, "distract")
    assert any(r.category == "multiple" and source[r.source_ids[0]].category == "simple_python" for r in distracted)
    for r in distracted:
        s = source[r.source_ids[0]]
        own = {t.name for t in s.tools}
        extra = [t for t in r.tools if t.name not in own]
        assert 1 <= len(extra) <= 3 and all(t in s.tools for t in r.tools if t.name in own)
        assert all(pool[json.dumps(t.model_dump(), sort_keys=True)] - {s.id} for t in extra)  # from other records
        assert _calls_json(r.ground_truth) == _calls_json(s.ground_truth)


def test_composition_targets_all_calls(src, runs):
    a, _, _ = runs
    source = _by_id(src)
    composed = _augmented(a, "compose")
    assert {r.category for r in composed} == {"parallel", "parallel_multiple"}
    for r in composed:
        calls = _calls_json(r.ground_truth)
        names = {c.name for c in r.ground_truth}
        assert len(calls) >= 2 and len(r.tools) == len({t.name for t in r.tools})
        assert (len(names) == 1) == (r.category == "parallel")
        parts = [source[i] for i in r.source_ids]
        if r.transforms == ["compose"]:
            assert len(parts) >= 2 and calls == [c for p in parts for c in _calls_json(p.ground_truth)]
            for p in parts:
                assert p.messages[0]["content"].strip().strip('"')[1:] in r.messages[0]["content"]
        else:  # the same request twice, the second with other values
            assert r.transforms == ["substitute", "compose"] and len(parts) == 1
            assert calls[: len(parts[0].ground_truth)] == _calls_json(parts[0].ground_truth)
            assert len(calls) == 2 * len(parts[0].ground_truth)
        assert all(t in [u for p in parts for u in p.tools] for t in r.tools)


def test_deletion_leaves_no_called_tool(src, runs):
    a, _, _ = runs
    source = _by_id(src)
    deleted = _augmented(a, "delete")
    for r in deleted:
        s = source[r.source_ids[0]]
        assert r.ground_truth is None and r.target_content == IRRELEVANT_ANSWER and r.category == "irrelevance"
        assert r.tools and not {c.name for c in s.ground_truth} & {t.name for t in r.tools}
        assert r.messages == s.messages
        kept = [t for t in s.tools if t.name not in {c.name for c in s.ground_truth}]
        assert (r.transforms == ["delete"]) == bool(kept) and (not kept or r.tools == kept)
    assert any(r.transforms == ["delete", "distract"] for r in deleted)


def test_substitution_swaps_query_and_target_together(src, runs):
    a, _, _ = runs
    source = _by_id(src)
    swapped = _augmented(a, "substitute")
    assert swapped
    for r in swapped:
        s = source[r.source_ids[0]]
        old_q, new_q = s.messages[0]["content"], r.messages[0]["content"]
        assert old_q != new_q and _calls_json(r.ground_truth) != _calls_json(s.ground_truth)
        old = [v for c in s.ground_truth for v, _, _ in leaves(c.arguments, None)]
        new = [v for c in r.ground_truth for v, _, _ in leaves(c.arguments, None)]
        changed = {(o, n) for o, n in zip(old, new) if o != n or type(o) is not type(n)}
        assert 1 <= len({o for o, _ in changed}) <= 2
        for o, n in changed:
            assert type(o) is type(n)
            assert find_once(old_q, o) is not None and not occurs(new_q, o)  # stated once, now gone
            assert occurs(new_q, n) and not occurs(old_q, n)
        assert not format_failures(r.ground_truth, r.tools)


def test_substitution_keeps_kind_and_skips_ambiguous_values():
    tool = ToolSpec(name="convert", parameters={"type": "object", "properties": {
        "amount": {"type": "integer"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit", "kelvin"]},
        "year": {"type": "integer"}}})
    query = "Convert 5000 from celsius, as measured in 2010-10-05 (year 2020)."
    call = ToolCall(name="convert", arguments={"amount": 5000, "unit": "celsius", "year": 2020})
    rec = Record(id="simple_python_2", category="simple_python", split="train", label_source="teacher",
                 messages=[{"role": "user", "content": query}], tools=[tool], ground_truth=[call])
    seen = Counter()
    for i in range(40):
        out = substitute(rec, Pools.build([rec]), random.Random(i))
        args = out.ground_truth[0].arguments
        q = out.messages[0]["content"]
        assert "2010-10-05" in q
        if args["amount"] != 5000:
            seen["amount"] += 1
            assert args["amount"] % 1000 == 0 and 2000 <= args["amount"] <= 8000 and str(args["amount"]) in q
        if args["unit"] != "celsius":
            seen["unit"] += 1
            assert args["unit"] in ("fahrenheit", "kelvin") and args["unit"] in q
        if args["year"] != 2020:
            seen["year"] += 1
            assert abs(args["year"] - 2020) <= 5 and str(args["year"]) in q
    assert set(seen) == {"amount", "unit", "year"}
    assert find_once("in 2010-10-05 and 10", 10) == ("10", (18, 20))
    assert find_once("10 and 10", 10) is None


def test_a_value_copied_from_the_description_example_is_substituted_first():
    """BFCL targets often repeat the example a parameter's description gives; the student learns to
    copy examples. Substitution swaps that value before any other, so the target then differs from
    the example and matches the query."""
    tool = ToolSpec(name="get_weather", parameters={"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "days": {"type": "integer", "description": "How many days ahead."}}, "required": ["location"]})

    def rec(i: int, city: str, days: int) -> Record:
        return Record(id=f"simple_python_{i}", category="simple_python", split="train", label_source="ground_truth",
                      messages=[{"role": "user", "content": f"Weather in {city} for the next {days} days?"}],
                      tools=[tool], ground_truth=[ToolCall(name="get_weather", arguments={"location": city, "days": days})])

    copying, other = rec(1, "San Francisco, CA", 3), rec(2, "Austin, TX", 4)
    assert copies_an_example(copying) and not copies_an_example(other)
    pools = Pools.build([copying, other, rec(3, "Denver, CO", 5), rec(4, "Boston, MA", 6)])
    for i in range(20):
        out = substitute(copying, pools, random.Random(i))
        args = out.ground_truth[0].arguments
        assert args["location"] != "San Francisco, CA" and args["location"] in out.messages[0]["content"], args
        assert "San Francisco, CA" not in out.messages[0]["content"]
        assert out.tools == [tool]  # the description keeps its example: now it differs from the target


def test_sources_copying_an_example_get_a_substituted_variant(src, runs):
    """Each tries substitution in its first slot: every one it applies to (some value has a
    replacement) gets a substituted variant, bar the odd one a later check rejects."""
    a, _, _ = runs
    sources = [r for r in _records(src) if r.has_target and not r.label_errors]
    pools = Pools.build(sources)
    applicable = []
    for r in (r for r in sources if copies_an_example(r)):
        try:
            substitute(r, pools, random.Random(0))
            applicable.append(r.id)
        except NotApplicable:
            pass
    substituted = {r.source_ids[0] for r in _augmented(a, "substitute")}
    assert len(applicable) >= 5
    assert sum(i in substituted for i in applicable) >= 0.9 * len(applicable), (len(applicable), substituted)


def test_no_eval_id_or_overlap_and_no_duplicates(src, runs):
    a, _, _ = runs
    eval_ids = {r.id for r in read_records(src, "eval")}
    index = eval_index(src)
    records = _records(a)
    for r in records:
        assert r.id not in eval_ids and not set(r.source_ids or []) & eval_ids
        assert index.check([r.id, *(r.source_ids or [])], r.messages[0]["content"]) is None, r.id
    examples = [json.dumps([r.messages, [t.model_dump() for t in r.tools], r.target_content,
                            _calls_json(r.ground_truth)], sort_keys=True) for r in records]
    assert len(set(examples)) == len(examples)
    dedup = DuplicateIndex()
    family: dict[str, set[str]] = {}
    for r in records:
        kind, other, _ = dedup.check(r.id, r.messages[0]["content"])
        mine = set(r.source_ids or [r.id])
        if kind == "unique":
            family[r.id] = mine
        elif r.transforms:
            assert family[other] & mine, f"{r.id} duplicates {other} from other sources"


def test_contaminated_original_is_dropped_with_its_augmentations(src, tmp_path):
    planted = tmp_path / "src"
    planted.mkdir()
    for name in ("eval.jsonl", "manifest.json", "test_case_ids_to_generate.json"):
        (planted / name).write_bytes((src / name).read_bytes())
    question = next(r for r in read_records(src, "eval") if len(r.messages[0]["content"].split()) > 15)
    rows = [json.loads(line) for line in (src / "train.jsonl").read_text().splitlines()]
    victim = next(r for r in rows if r["category"] == "simple_python")
    victim["messages"][0]["content"] = "Please help: " + question.messages[0]["content"]
    (planted / "train.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    result = run_augment(AugmentOptions(data=planted, out=tmp_path / "out", multiplier=3))
    dropped = json.loads((tmp_path / "out" / "manifest.json").read_text())["augment"]["dropped_originals"]
    assert victim["id"] in dropped
    assert result.stats["original"]["rejected"] == {"contamination/eval_overlap": len(dropped)}
    assert not any(victim["id"] in (r.source_ids or [r.id]) for r in _records(tmp_path / "out"))


def test_transform_subset_and_multiplier(src, tmp_path):
    one = run_augment(AugmentOptions(data=src, out=tmp_path / "one", multiplier=1, transforms=["mask", "delete"]))
    three = run_augment(AugmentOptions(data=src, out=tmp_path / "three", multiplier=3, transforms=["mask", "delete"]))
    assert set(one.stats) == {"original", "mask", "delete"}
    steps = {tuple(r.transforms) for r in _records(tmp_path / "one") if r.transforms}
    assert steps <= {("mask",), ("delete",), ("delete", "distract")}
    sources = one.stats["original"]["out"]
    made_one = one.written - sources
    made_three = three.written - sources
    assert 0.6 * sources <= made_one <= sources and made_three > 1.5 * made_one


def test_max_length_makes_no_augmented_record_training_would_drop(src, runs, tmp_path, smollm2_tokenizer):
    """With a token budget, a transform whose record would be over it gives way to the slot's next one."""
    from fcdistill.data.export import trl_record
    from fcdistill.models import ensure_fc_token

    ensure_fc_token(smollm2_tokenizer, "<tool_call>")
    fmt = ChatFormat(smollm2_tokenizer, fc_token="<tool_call>")

    def tokens(rec: Record) -> int:
        row = trl_record(fmt, rec)
        return len(smollm2_tokenizer(row["prompt"] + row["completion"])["input_ids"])

    budget = 560
    free = [tokens(r) for r in _records(runs[0]) if r.transforms]
    assert sum(n > budget for n in free) >= 10, sorted(free)[-12:]  # without a budget, many are over it
    result = run_augment(AugmentOptions(data=src, out=tmp_path / "fit", seed=3, max_length=budget))
    made = [r for r in _records(tmp_path / "fit") if r.transforms]
    assert made and max(tokens(r) for r in made) <= budget
    over = sum(st["not_applicable"].get("over_max_length", 0) for st in result.stats.values())
    assert over >= 10 and all(st["consistent"] for st in result.stats.values())
    assert len(made) > sum(n <= budget for n in free)  # the slots went to other transforms
    originals = [r for r in _records(tmp_path / "fit") if not r.transforms]
    assert len(originals) == result.stats["original"]["out"] and max(tokens(r) for r in originals) > budget
    options = json.loads((tmp_path / "fit" / "manifest.json").read_text())["augment"]["options"]
    assert options["max_length"] == budget and options["model"] == "smollm2-135m"


def test_export_is_train_ready(runs, smollm2_dir):
    a, _, _ = runs
    out = a.parent / "export-check.trl.jsonl"
    proc = _fcd("data", "export", "--data", str(a), "--split", "train", "--format", "trl", "--labels", "ground-truth",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = {r.id: r for r in _records(a)}
    trainable = [r for r in records.values() if r.has_target and not r.label_errors]
    assert [r["id"] for r in rows] == [r.id for r in trainable]
    assert {records[r["id"]].category for r in rows} >= set(CATS) | {"parallel", "parallel_multiple"}
    assert sum(bool(records[r["id"]].transforms) for r in rows) > len(rows) // 3
    chat = ChatFormat()
    for row in rows:
        rec = records[row["id"]]
        assert row["prompt"].endswith("<|im_start|>assistant\n") and row["completion"].endswith("<|im_end|>")
        parsed = chat.parse(row["completion"])
        assert parsed.error is None
        if rec.ground_truth is not None:
            assert _calls_json(parsed.tool_calls) == _calls_json(rec.ground_truth)
            assert all(t.name in row["prompt"] for t in rec.tools)
        else:
            assert parsed.content == IRRELEVANT_ANSWER and not parsed.tool_calls


@pytest.mark.parametrize("args,needle", [
    (["--transforms", "mask,nonsense"], "unknown --transforms nonsense"),
    (["--multiplier", "0"], "multiplier"),
    (["--max-length", "0"], "--max-length: Input should be greater than or equal to 8"),
    (["--max-length", "512", "--model", "/nonexistent/model"], "--max-length counts tokens of /nonexistent/model"),
])
def test_cli_bad_input_exits_2_with_one_line(src, tmp_path, args, needle):
    proc = _fcd("data", "augment", "--data", str(src), "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_killed_at_a_random_point_then_rerun_gives_the_same_files(src, runs, tmp_path):
    """SIGKILL mid-run (a seeded-random moment within a run's duration): no manifest means the
    directory is incomplete; the rerun writes exactly what an uninterrupted run does."""
    import random
    import signal
    import time

    reference = runs[0]  # seed 3, uninterrupted
    out = tmp_path / "killed"
    code = "from fcdistill.cli import app; import sys; sys.argv = ['fcd', *sys.argv[1:]]; app()"
    base = [sys.executable, "-c", code, "data", "augment", "--data", str(src), "--seed", "3", "--no-progress"]
    args = [*base, "--out", str(out)]
    started = time.monotonic()
    probe = subprocess.run([*base, "--out", str(tmp_path / "timed")], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    duration = time.monotonic() - started
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(11).uniform(0.3, 0.95) * duration)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if (out / "manifest.json").is_file():  # it got to the end: then every file is whole already
        assert (out / "train.jsonl").read_bytes() == (reference / "train.jsonl").read_bytes()
    assert not list(out.glob("*.tmp")) or not (out / "manifest.json").is_file()
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    for name in ("train.jsonl", "eval.jsonl", "manifest.json", "augment_stats.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))


def test_cli_refuses_to_overwrite_its_source(src):
    proc = _fcd("data", "augment", "--data", str(src), "--out", str(src))
    assert proc.returncode == 2 and "--out must differ from --data" in proc.stderr
