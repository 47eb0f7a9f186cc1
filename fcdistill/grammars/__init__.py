"""Grammar-constrained tool calls: tools + tool_choice -> a token-level constraint (outlines-core).

Semantics (DESIGN.md): `auto` leaves text free and activates the call grammar lazily when the FC
token is sampled; `required` and a named function force FC first; `none` masks FC; with
`parallel_tool_calls` false the array holds exactly one call. After FC the output is a JSON array of
`{"name", "arguments"}` whose arguments follow each tool's schema, then end-of-turn. Given its
max_tokens and a `LoopGuard`, a sequence always closes its call (or JSON value) within the budget and
is steered to close a value it loops in.
"""

from fcdistill.grammars.constraint import (
    CompiledGrammar,
    GrammarError,
    SequenceConstraint,
    ToolChoice,
    compile_grammar,
    compile_pending,
    grammar_enforces,
    grammar_cache_info,
    set_grammar_cache_limit,
)
from fcdistill.grammars.guard import LoopGuard
from fcdistill.grammars.vocabulary import TokenVocabulary, token_vocabulary

__all__ = [
    "CompiledGrammar", "GrammarError", "LoopGuard", "SequenceConstraint", "ToolChoice", "TokenVocabulary",
    "compile_grammar", "compile_pending", "grammar_cache_info", "grammar_enforces", "set_grammar_cache_limit", "token_vocabulary",
]
