"""Scoring: decode a model's answer, then judge it with bfcl_eval's own ast_checker.

Rules, as BFCL's evaluator applies them to single-turn categories:
- AST categories: the decoded calls `[{"fn": {"arg": value}}]` go to `ast_checker` with the BFCL
  function docs and possible answer; a text answer (no call) or a malformed call is wrong.
- irrelevance / live_irrelevance: correct when no call is made (text, or a call that does not decode).
- live_relevance: correct when at least one call decodes.
- multi-turn: a whole conversation, judged by bfcl's multi-turn checker (eval/multi_turn.py).

Decoding never raises: malformed output becomes an error type and a reason on the item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fcdistill.eval.dataset import EvalItem, category_kind
from fcdistill.eval.decode import decode


@dataclass
class ItemScore:
    """One scored answer: what came back, what it decoded to, and whether BFCL counts it correct."""

    id: str
    category: str
    valid: bool
    error_type: str | None = None
    error: str | None = None
    decoded: list[Any] | None = None  # BFCL's shape (multi-turn: call texts a turn, a step); None: nothing decoded
    raw: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _snippet(text: str | None, n: int = 80) -> str:
    s = " ".join((text or "").split())
    return repr(s[:n] + ("..." if len(s) > n else ""))


class Scorer:
    """Judges answers with bfcl_eval's ast_checker (imported once; importing it takes seconds)."""

    def __init__(self) -> None:
        from fcdistill.bfcl_env import ast_check, bfcl_import

        bfcl_import("bfcl_eval.eval_checker.ast_eval.ast_checker")  # the slow import, here rather than mid-run
        self._check = ast_check

    def score(self, item: EvalItem, output: dict[str, Any]) -> ItemScore:
        base = dict(id=item.id, category=item.category, raw=output)
        kind = category_kind(item.category)
        if output.get("error"):
            # The endpoint refused this one question (e.g. too long): no call was made. BFCL records
            # such an answer as error text, so irrelevance counts it correct and the rest wrong.
            if kind == "irrelevance":
                return ItemScore(**base, valid=True, decoded=[])
            return ItemScore(**base, valid=False, error_type="endpoint_error", error=str(output["error"])[:300])
        if kind == "multi_turn":
            from fcdistill.eval.multi_turn import check_conversation

            valid, error_type, error, turns = check_conversation(item.entry or {}, item.turn_answers or [], output)
            return ItemScore(**base, valid=valid, error_type=error_type, error=error, decoded=turns)
        dec = decode(output, item.language)
        decoded = [c.to_bfcl() for c in dec.calls] if dec.calls or dec.malformed is None else None
        base["decoded"] = decoded
        cut = " (cut off at max_tokens)" if output.get("finish_reason") == "length" else ""
        if kind == "irrelevance":
            if dec.calls:
                return ItemScore(**base, valid=False, error_type="irrelevance:made_call",
                                 error=f"made {len(dec.calls)} call(s) where no function fits")
            return ItemScore(**base, valid=True)
        if kind == "relevance":
            if dec.calls:
                return ItemScore(**base, valid=True)
            if dec.malformed:
                return ItemScore(**base, valid=False, error_type="relevance:malformed", error=dec.malformed + cut)
            return ItemScore(**base, valid=False, error_type="relevance:no_call",
                             error=f"answered in text where a call was expected{cut}: {_snippet(dec.text)}")
        if dec.malformed:
            return ItemScore(**base, valid=False, error_type="decode:malformed", error=dec.malformed + cut)
        if not dec.calls:
            return ItemScore(**base, valid=False, error_type="ast:no_call",
                             error=f"answered in text where a call was expected{cut}: {_snippet(dec.text)}")
        if item.record.possible_answer is None:
            return ItemScore(**base, valid=False, error_type="ast:no_possible_answer",
                             error="the record has no possible answer to check against")
        valid, error_type, error = self._check(item.functions, decoded, item.record.possible_answer, item.language,
                                               item.checker_category)
        return ItemScore(**base, valid=valid, error_type=error_type, error=error)
