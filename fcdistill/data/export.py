"""Exports of a split: TRL prompt-completion, OpenAI chat, and the two Amazon Bedrock distillation formats.

TRL records are rendered by chat_format (the student's template, our FC token); the others carry the
conversation and tools in their own API's shape, so any trainer or teacher can take them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from fcdistill.chat_format import ChatFormat, as_messages, render_python_calls
from fcdistill.data.bfcl import DataError, Record, read_records

EXPORT_FORMATS = ("trl", "openai", "bedrock-prompt", "bedrock-toolconfig")
BEDROCK_SCHEMA = "bedrock-conversation-2024"


def _target_message(rec: Record) -> dict[str, Any] | None:
    if rec.ground_truth is not None:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for i, c in enumerate(rec.ground_truth)]}
    if rec.target_content is not None:
        return {"role": "assistant", "content": rec.target_content}
    return None


def _single_turn_only(rec: Record, fmt: str) -> None:
    if rec.conversation is not None:
        raise DataError(f"{rec.id}: the {fmt} export holds one question and one answer; multi-turn records "
                        "go to trl or openai (leave multi_turn_* out of this export's data)")


def _bfcl_prompt_messages(rec: Record) -> list[dict[str, Any]]:
    """The question with BFCL's own prompt-mode system prompt (python-syntax calls), from bfcl_eval."""
    from fcdistill.bfcl_env import bfcl_import

    add_system = bfcl_import("bfcl_eval.model_handler.utils", "system_prompt_pre_processing_chat_model")
    return add_system([dict(m) for m in rec.messages], [t.model_dump() for t in rec.tools], rec.id)


def _bedrock_messages(rec: Record) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": [{"text": m["content"]}]} for m in rec.messages if m["role"] != "system"]


def _bedrock_system(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"text": m["content"]} for m in messages if m["role"] == "system"]


def _all_tools(rec: Record) -> list[Any]:
    """The record's tools, with those a multi-turn conversation adds later (an API takes one list)."""
    return [*rec.tools, *(t for added in (rec.added_tools or {}).values() for t in added)]


def to_openai(rec: Record, with_target: bool) -> dict[str, Any]:
    if rec.conversation is not None:
        messages = [dict(m) for turn in (rec.conversation if with_target else rec.turns or []) for m in turn]
        return {"id": rec.id, "messages": messages, "tools": [t.to_openai() for t in _all_tools(rec)]}
    messages = [dict(m) for m in rec.messages]
    target = _target_message(rec) if with_target else None
    if target:
        messages.append(target)
    return {"id": rec.id, "messages": messages, "tools": [t.to_openai() for t in rec.tools]}


def to_bedrock_prompt(rec: Record, with_target: bool) -> dict[str, Any]:
    """Tools in the system prompt (BFCL's python-syntax prompt); the target is a python call list."""
    _single_turn_only(rec, "bedrock-prompt")
    messages = _bfcl_prompt_messages(rec)
    conv: dict[str, Any] = {"schemaVersion": BEDROCK_SCHEMA, "system": _bedrock_system(messages),
                            "messages": [{"role": m["role"], "content": [{"text": m["content"]}]}
                                         for m in messages if m["role"] != "system"]}
    if with_target and rec.ground_truth is not None:
        conv["messages"].append({"role": "assistant", "content": [{"text": render_python_calls(rec.ground_truth)}]})
    elif with_target and rec.target_content is not None:
        conv["messages"].append({"role": "assistant", "content": [{"text": rec.target_content}]})
    return conv


def to_bedrock_toolconfig(rec: Record, with_target: bool) -> dict[str, Any]:
    """Tools in `toolConfig` (Bedrock toolSpec); the target is Converse `toolUse` blocks."""
    _single_turn_only(rec, "bedrock-toolconfig")
    conv: dict[str, Any] = {"schemaVersion": BEDROCK_SCHEMA, "system": _bedrock_system(rec.messages),
                            "messages": _bedrock_messages(rec),
                            "toolConfig": {"tools": [t.to_bedrock() for t in rec.tools]}}
    if not conv["system"]:
        del conv["system"]
    if with_target and rec.ground_truth is not None:
        conv["messages"].append({"role": "assistant", "content": [
            {"toolUse": {"toolUseId": f"tooluse_{i}", "name": c.name, "input": c.arguments}}
            for i, c in enumerate(rec.ground_truth)]})
    elif with_target and rec.target_content is not None:
        conv["messages"].append({"role": "assistant", "content": [{"text": rec.target_content}]})
    return conv


def example_lengths(tokenizer: Any, rows: list[dict[str, str]]) -> list[int]:
    """Tokens of each prompt-completion pair as training counts them against its max_length."""
    return [len(ids) for ids in tokenizer([r["prompt"] + r["completion"] for r in rows])["input_ids"]]


def trl_record(fmt: ChatFormat, rec: Record) -> dict[str, str]:
    """One prompt-completion pair; the prompt is not learned, the completion is."""
    prompt = fmt.render_prompt(rec.messages, rec.tools)
    completion = fmt.render_target(rec.target_content, rec.ground_truth or ())
    return {"id": rec.id, "prompt": prompt, "completion": completion}


def trl_records(fmt: ChatFormat, rec: Record) -> list[dict[str, str]]:
    """A record's prompt-completion pairs: one, or for a multi-turn conversation one per assistant
    message (`ID#k`), each prompted with the conversation before it and the tools offered by then.
    Loss falls on assistant messages only; tool results and user turns are only ever prompt."""
    if rec.conversation is None:
        return [trl_record(fmt, rec)]
    rows: list[dict[str, str]] = []
    history: list[dict[str, Any]] = []
    tools = list(rec.tools)
    for t, turn in enumerate(rec.conversation):
        tools += (rec.added_tools or {}).get(str(t), [])
        for m in turn:
            if m["role"] == "assistant":
                target = as_messages([m])[0]
                rows.append({"id": f"{rec.id}#{len(rows)}", "prompt": fmt.render_prompt(history, tools),
                             "completion": fmt.render_target(target.content, target.tool_calls)})
            history.append(m)
    return rows


def select_records(records: list[Record], split: str, labels: str,
                   data_dir: Path | None = None) -> tuple[list[Record], list[str]]:
    """Records that can be trained on under `labels`, and why each other one was skipped.

    With labels="labeled", accepted teacher labels in DATA/labels/ (written by `fcd label`) replace the
    targets of the records that await them; BFCL's own answers for those records are never used.
    """
    if labels not in ("labeled", "ground-truth"):
        raise DataError(f"unknown --labels {labels!r}; choose labeled or ground-truth")
    if split == "eval":
        return records, []
    notes: dict[str, str] = {}
    if labels == "labeled" and data_dir is not None:
        from fcdistill.data.labels import apply_teacher_labels

        records, why = apply_teacher_labels(records, data_dir)
        notes = {n.split(": ", 1)[0]: n for n in why}
    kept, skipped = [], []
    for r in records:
        if not r.has_target:
            skipped.append(f"{r.id}: no target (relevance items stay unlabeled)")
        elif r.label_errors:
            skipped.append(f"{r.id}: ground truth fails its schema: {r.label_errors[0]}")
        elif labels == "labeled" and r.label_source not in ("ground_truth", "teacher_labeled"):
            skipped.append(notes.get(r.id, f"{r.id}: awaits teacher labels"))
        else:
            kept.append(r)
    return kept, skipped


TOOL_NAME_MODES = ("safe", "keep")
SAFE_BY_DEFAULT = ("openai", "bedrock-toolconfig")  # their APIs allow only ^[a-zA-Z0-9_-]{1,64}$ in tool names


def side_file(path: Path, kind: str) -> Path:
    """A file written next to an export: `train.openai.skipped.txt`, `train.openai.tool_names.json`."""
    return path.with_suffix(f".{kind}")


def rename_tools(records: list[Record]) -> tuple[list[Record], dict[str, str]]:
    """Records with API-safe tool names in tools and targets, and the mapping back (safe -> original).

    One mapping for the whole export, so it reverses every record (names already safe keep themselves)."""
    from fcdistill.tools import safe_tool_names

    names = safe_tool_names(sorted({t.name for r in records for t in r.tools}
                                   | {c.name for r in records for c in r.ground_truth or ()}))
    renamed = [r.model_copy(update={
        "tools": [t.model_copy(update={"name": names[t.name]}) for t in r.tools],
        "ground_truth": None if r.ground_truth is None else
        [c.model_copy(update={"name": names[c.name]}) for c in r.ground_truth]}) for r in records]
    return renamed, {new: old for old, new in names.items() if new != old}


def _empty_export_message(data_dir: Path, split: str, labels: str, skipped: list[str], listed: Path) -> str:
    if not skipped:
        return f"{data_dir}/{split}.jsonl holds no records"
    awaiting = sum("awaits teacher labels" in s for s in skipped)
    why = f"all {len(skipped)} {split} records were skipped (reasons in {listed})"
    if labels == "labeled" and awaiting:
        return (f"nothing to export: {why}; {awaiting} await teacher labels. Run `fcd label --data {data_dir}` "
                f"first, or export BFCL's own answers with --labels ground-truth")
    return f"nothing to export: {why}"


def export_split(data_dir: Path, split: str, fmt: str, out: Path | None, *, model: str = "smollm2-135m",
                 fc_token: str = "<tool_call>", labels: str = "labeled",
                 tool_names: str | None = None) -> tuple[Path, int, int]:
    """Write `split` of `data_dir` as `fmt` JSONL; returns (path, written, skipped).

    `tool_names`: "safe" replaces characters OpenAI and Bedrock refuse in tool names (BFCL's
    `math.factorial` becomes `math_factorial`) in tools and targets alike, and writes the mapping back
    to PATH.tool_names.json; "keep" leaves BFCL's names. Default: safe for openai and bedrock-toolconfig,
    keep for trl and bedrock-prompt (names inside a prompt need no API's approval).
    Side files from an earlier export to the same path that this one does not write are removed; an
    export that would write no record raises DataError naming the fix.
    """
    if fmt not in EXPORT_FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    tool_names = tool_names or ("safe" if fmt in SAFE_BY_DEFAULT else "keep")
    if tool_names not in TOOL_NAME_MODES:
        raise DataError(f"unknown --tool-names {tool_names!r}; choose safe or keep")
    if fmt == "trl" and split == "eval":
        raise DataError("the trl format needs targets; export the train split")
    records, skipped = select_records(read_records(data_dir, split), split, labels, data_dir)
    if fmt.startswith("bedrock"):  # one question, one answer: a multi-turn conversation does not fit
        skipped += [f"{r.id}: multi-turn; the {fmt} format holds one question and one answer" for r in records
                    if r.conversation is not None]
        records = [r for r in records if r.conversation is None]
    path = out or Path(data_dir) / "export" / f"{split}.{fmt}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    skipped_file, names_file = side_file(path, "skipped.txt"), side_file(path, "tool_names.json")
    for stale in (skipped_file, names_file):
        stale.unlink(missing_ok=True)
    if skipped:
        skipped_file.write_text("\n".join(skipped) + "\n")
    if not records:
        path.unlink(missing_ok=True)  # an older export here would be read as this one's
        raise DataError(_empty_export_message(Path(data_dir), split, labels, skipped, skipped_file))
    with_target = split == "train"
    writer: Callable[[Record], dict[str, Any] | list[dict[str, str]]]
    if fmt == "trl":
        from fcdistill.models import ensure_fc_token, load_tokenizer

        tokenizer = load_tokenizer(model)
        ensure_fc_token(tokenizer, fc_token)
        chat = ChatFormat(tokenizer, fc_token=fc_token)
        writer = lambda r: trl_records(chat, r)  # noqa: E731
    elif fmt == "openai":
        writer = lambda r: to_openai(r, with_target)  # noqa: E731
    elif fmt == "bedrock-prompt":
        writer = lambda r: to_bedrock_prompt(r, with_target)  # noqa: E731
    else:
        writer = lambda r: to_bedrock_toolconfig(r, with_target)  # noqa: E731
    if tool_names == "safe":
        records, back = rename_tools(records)
        if back:
            names_file.write_text(json.dumps({"tool_names": "safe", "to_original": dict(sorted(back.items()))},
                                             indent=2, ensure_ascii=False) + "\n")
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            rows = writer(rec)
            for row in rows if isinstance(rows, list) else [rows]:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return path, len(records), len(skipped)
