"""BFCL multi-turn without a model: bfcl_eval's real backends driven by dispatch, its real checker, the split.

The ground truth of every entry, replayed as a model's tool calls, must pass bfcl's own multi-turn
checker (state and response checks) with our dispatcher in place of bfcl's `eval`; the same replay with
a call left out must fail. The conversation loop itself runs against a real server in test_eval_endpoint.
"""

from __future__ import annotations

import inspect
import json

import pytest

from fcdistill.bfcl_env import multi_turn_entries, multi_turn_ground_truth
from fcdistill.data.bfcl import MULTI_TURN_CATEGORIES, SplitOptions, prepare_bfcl, read_records
from fcdistill.eval.dataset import load_eval_set
from fcdistill.bfcl_backends import Backends, is_long_context, parse_call_text
from fcdistill.eval.multi_turn import check_conversation


def _replay(category: str, entry: dict, turns_gt: list[list[str]], drop_last: bool = False) -> dict:
    """The ground truth as tool calls (positional arguments named by the method's signature), one step a
    turn, each turn closed by a text answer, as a model's conversation would be recorded."""
    b = Backends(entry["involved_classes"], entry.get("initial_config") or {}, is_long_context(category))
    turns = []
    for texts in turns_gt:
        calls = []
        for text in texts:
            name, args, kwargs = parse_call_text(text)
            bound = inspect.signature(b._methods[name]).bind(*args, **kwargs)
            calls.append({"name": name, "arguments": json.dumps(dict(bound.arguments))})
        if drop_last:
            calls = calls[:-1]
        turns.append(([{"content": None, "tool_calls": calls}] if calls else []) + [{"content": "Done.", "tool_calls": []}])
    return {"turns": turns}


@pytest.mark.parametrize("category", MULTI_TURN_CATEGORIES)
def test_ground_truth_replayed_passes_bfcl_checker_and_a_missing_call_fails(category):
    entries, answers = multi_turn_entries(category), multi_turn_ground_truth(category)
    assert len(entries) == 200 and set(entries) == set(answers)
    passed = [eid for eid, e in entries.items() if check_conversation(e, answers[eid], _replay(category, e, answers[eid]))[0]]
    assert len(passed) == len(entries)
    ids = sorted(entries)[:40]
    broken = [check_conversation(entries[i], answers[i], _replay(category, entries[i], answers[i], drop_last=True)) for i in ids]
    assert not any(valid for valid, *_ in broken)
    assert {error_type for _, error_type, *_ in broken} <= {
        "multi_turn:empty_turn_model_response", "multi_turn:instance_state_mismatch",
        "multi_turn:execution_response_mismatch"}


def test_a_conversation_cut_short_is_force_terminated():
    category = "multi_turn_base"
    entry = multi_turn_entries(category)["multi_turn_base_0"]
    answer = multi_turn_ground_truth(category)["multi_turn_base_0"]
    full = _replay(category, entry, answer)
    valid, error_type, _, _ = check_conversation(entry, answer, {"turns": full["turns"][:-1]})
    assert not valid and error_type == "multi_turn:force_terminated"
    assert check_conversation(entry, answer, {"error": "HTTP 400: too long"})[1] == "endpoint_error"


def test_calls_are_dispatched_never_evaluated(tmp_path):
    entry = multi_turn_entries("multi_turn_base")["multi_turn_base_0"]
    b = Backends(entry["involved_classes"], entry["initial_config"], long_context=False)
    marker = tmp_path / "pwned"
    # literal arguments only: an expression is refused before anything runs
    for text in (f"touch(file_name=__import__('pathlib').Path('{marker}').touch())", "ls(a=1+1)", "(lambda: 1)()"):
        with pytest.raises(ValueError):
            parse_call_text(text)
        assert b.call_text(text).startswith("Error during execution")
    assert not marker.exists()
    # names reach public backend methods only: builtins, privates and bfcl's refused names do not run
    assert b.call("eval", kwargs={"source": "1"}) == "Error during execution: name 'eval' is not defined"
    assert b.call("_load_scenario", kwargs={"scenario": {}}).startswith("Error during execution: name")
    assert b.call("exit") == "Error during execution: Function call exit is not allowed."
    # a real call changes the simulated state; a bad argument is the backend's error text, as bfcl sends it
    assert json.loads(b.call("cd", kwargs={"folder": "document"})) == {"current_working_directory": "document"}
    assert "unexpected keyword argument 'nope'" in b.call("ls", kwargs={"nope": 1})


def test_split_keeps_ids_apart_and_the_eval_set_carries_bfcl_entries(tmp_path):
    cats = ["multi_turn_base", "multi_turn_miss_func"]
    opts = SplitOptions(categories=cats, max_per_category={c: 40 for c in cats}, seed=7)
    result = prepare_bfcl(opts, tmp_path / "a")
    again = prepare_bfcl(opts, tmp_path / "b")
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() == (tmp_path / "b" / "eval.jsonl").read_bytes()
    assert result.counts == again.counts
    train, evals = read_records(tmp_path / "a", "train"), read_records(tmp_path / "a", "eval")
    assert {r.id for r in train}.isdisjoint({r.id for r in evals})
    for c in cats:
        assert result.counts[c]["eval"] == 20
        assert result.counts[c]["train"] + result.counts[c]["dropped_eval_overlap"] == 20
    # miss_func repeats base's conversations: a train conversation asked in the other category's eval is dropped
    assert sum(c["dropped_eval_overlap"] for c in result.counts.values()) > 0
    eval_texts = {r.user_text for r in evals}
    assert not any(r.user_text in eval_texts for r in train)
    assert all(r.turns and r.messages == r.turns[0] and r.ground_truth is None and r.conversation for r in train)
    assert {r.label_source for r in train} == {"ground_truth", "teacher"}  # a mix-in share, as single-turn
    _, _, items = load_eval_set(tmp_path / "a", ["multi_turn_miss_func"])
    assert len(items) == 20 and all(it.entry and it.turn_answers for it in items)
    assert any(it.entry.get("missed_function") for it in items)


def test_ground_truth_becomes_a_conversation_with_backend_results_and_trains_per_assistant_message(smollm2_tokenizer):
    from fcdistill.chat_format import ChatFormat
    from fcdistill.data.bfcl import TURN_CANNOT, TURN_DONE, load_category
    from fcdistill.data.export import to_openai, trl_records

    records = {r.id: r for r in load_category("multi_turn_miss_func")[0]}
    rec = records["multi_turn_miss_func_0"]
    answer = multi_turn_ground_truth("multi_turn_miss_func")[rec.id]
    assert len(rec.conversation) == len(answer) == len(rec.turns)
    for turn, calls in zip(rec.conversation, answer):
        made = [m for m in turn if m["role"] == "assistant" and m.get("tool_calls")]
        assert len(made) == len(calls)  # one call a step, each answered by the backend
        assert [m["role"] for m in turn].count("tool") == len(calls)
        assert turn[-1] == {"role": "assistant", "content": TURN_DONE if calls else TURN_CANNOT}
    # `sort('final_report.pdf')`: a positional argument named from the backend method
    assert {"name": "sort", "arguments": json.dumps({"file_name": "final_report.pdf"})} in [
        m["tool_calls"][0]["function"] for turn in rec.conversation for m in turn if m.get("tool_calls")]
    results = [m["content"] for turn in rec.conversation for m in turn if m["role"] == "tool"]
    assert not any(r.startswith("Error during execution") for r in results)
    # the held-back function joins the tools at its turn, as `bfcl generate` adds it
    (turn_index, added), = rec.added_tools.items()
    chat = ChatFormat(smollm2_tokenizer)
    rows = trl_records(chat, rec)
    assert len(rows) == sum(m["role"] == "assistant" for turn in rec.conversation for m in turn)
    before = sum(m["role"] == "assistant" for turn in rec.conversation[:int(turn_index)] for m in turn)
    name = f'"name":"{added[0].name}"'
    assert name not in rows[before - 1]["prompt"] and name in rows[before]["prompt"]
    assert {t["function"]["name"] for t in to_openai(rec, True)["tools"]} >= {t.name for t in added}
    # BFCL's own ground truth that breaks its schema is reported, and such records are not trained on
    assert any("ticket_id" in e for r in records.values() for e in r.label_errors)


def test_bfcl_evaluate_scores_our_conversations_as_we_do(tmp_path):
    """Conversations in our output format, written as bfcl result files and judged by `bfcl evaluate`
    (its own eval-based executor): the ground truth replayed passes, a replay missing calls fails, and
    the verdicts agree with ours item by item."""
    from fcdistill.eval.official import official_rescore
    from fcdistill.eval.runner import OUTPUTS, RUN_INFO

    data = tmp_path / "data"
    prepare_bfcl(SplitOptions(categories=["multi_turn_base"], max_per_category={"multi_turn_base": 12}), data)
    _, _, items = load_eval_set(data, ["multi_turn_base"])
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"id": it.id, "category": it.category, "mode": "fc",
             **_replay(it.category, it.entry, it.turn_answers, drop_last=i % 2 == 1)} for i, it in enumerate(items)]
    (run / OUTPUTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / RUN_INFO).write_text(json.dumps({"identity": {"mode": "fc", "data_dir": str(data), "model": "replay"}}))
    report = official_rescore(run, tmp_path / "official")
    (part,) = report["categories"]
    assert report["all_agree"], json.dumps(part, indent=1)[:2000]
    assert part["official"]["total"] == len(items) == 6
    assert part["official"]["correct"] == 3 and part["ours"]["correct"] == 3


def test_exports_of_multi_turn_records(tmp_path):
    """trl: one row per assistant message; openai: the whole conversation; bedrock: skipped with a reason."""
    from fcdistill.data.bfcl import DataError
    from fcdistill.data.export import export_split

    data = tmp_path / "data"
    prepare_bfcl(SplitOptions(categories=["multi_turn_base"], max_per_category={"multi_turn_base": 6}), data)
    train = [r for r in read_records(data, "train") if not r.label_errors]
    path, written, _ = export_split(data, "train", "trl", None, labels="ground-truth")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == len(train)
    assert len(rows) == sum(m["role"] == "assistant" for r in train for turn in r.conversation for m in turn)
    path, _, _ = export_split(data, "train", "openai", None, labels="ground-truth")
    convs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(c["messages"]) for c in convs] == [sum(map(len, r.conversation)) for r in train]
    with pytest.raises(DataError, match="nothing to export"):
        export_split(data, "train", "bedrock-prompt", None, labels="ground-truth")
    assert "multi-turn; the bedrock-prompt format" in (data / "export" / "train.bedrock-prompt.skipped.txt").read_text()
