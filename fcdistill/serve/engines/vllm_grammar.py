"""Our grammar constraint inside vLLM's engine: a v1 logits processor over the same SequenceConstraint.

Why a logits processor and not vLLM's structured outputs (regex / structural tag): the semantics have
to be exactly those of the embedded engine, and two of them have no structured-output equivalent.
`auto` activates the call grammar lazily at the FC token, which is a special token that vLLM's
grammar backends do not match as text; and `none` must mask that token while leaving text free.
Running the very `SequenceConstraint` the hf engine runs (compiled once, in the API process, by the
same cached `compile_grammar`) gives one implementation, tested once, on both engines. Measured on
SmolLM2 in `benchmarks/serve_bench.py --engine vllm`: see benchmarks/results/serve_bench_vllm.json.

The processor runs in vLLM's engine-core process. The compiled outlines-core Index and its
closing-distance table travel with the request as pickled bytes in `SamplingParams.extra_args`
(pickling a simple_python Index takes ~5 ms, unpickling ~1 ms, compiling it ~250 ms) and are cached
there by their key, so a repeated tool set is unpickled once. The request's max_tokens and loop-guard
limits travel as plain values; the loop guard reads token bytes, which the engine core builds from
the model's tokenizer the first time a guarded request arrives.

Under `--grammar-backend llguidance` the regex travels (and the FC token's text), and the engine core
builds the llguidance matcher from it over the vocabulary it builds once from the same tokenizer
(about a millisecond a tool set), with outlines' Index compiled there in the background only when
the budget or the loop guard could narrow an answer, as in the hf engine. Once the API process has
an Index for the grammar (a budget that could bind from the first token, or its own mirror's
hand-over), later requests carry it pickled, and the engine core takes it instead of compiling.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections import OrderedDict
from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from fcdistill.grammars.constraint import CompiledGrammar, SequenceConstraint
from fcdistill.grammars.guard import LoopGuard
from fcdistill.grammars.vocabulary import TokenVocabulary, token_pieces

EXTRA_KEY = "fcdistill_grammar"
_INDEX_CACHE_SIZE = 256


def grammar_args(constraint: SequenceConstraint, key: str, index_bytes: bytes | None,
                 fc_token: str | None = None) -> dict[str, Any]:
    """What the engine core needs to rebuild the constraint: plain data, msgpack-serializable.

    `index_bytes` is the pickled (Index, CloseTable) pair of the compiled grammar, if there is one yet; a
    grammar llguidance masks also travels as its regex and `close_bound` (and `fc_token`, to build the
    vocabulary), so that the engine core masks with llguidance as the API process's mirror does."""
    v, g = constraint.vocab, constraint.grammar
    llguidance = g.later is not None
    return {"mode": g.mode, "key": key, "index": index_bytes,
            "regex": g.later.regex if llguidance else None, "close_bound": g.close_bound if llguidance else None,
            "fc_token": fc_token if llguidance else None,
            "size": v.size, "eot_id": v.eot_id, "fc_id": v.fc_id, "max_tokens": constraint.max_tokens,
            "guard": dataclasses.asdict(constraint.guard) if constraint.guard is not None else None}


class _RequestConstraint:
    """Per-request callable: advance past the tokens generated since the last step, then mask."""

    def __init__(self, constraint: SequenceConstraint):
        self.constraint = constraint
        self.seen = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        c = self.constraint
        for token in output_ids[self.seen:]:
            c.advance(int(token))
        self.seen = len(output_ids)
        row = logits if logits.dtype == torch.float32 else logits.float()
        c.mask_(row)
        return row if row is logits else row.to(logits.dtype)


class GrammarLogitsProcessor(AdapterLogitsProcessor):
    """Applies the request's tool-call / JSON constraint; requests without one pass untouched."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._indexes: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._matched: OrderedDict[str, CompiledGrammar] = OrderedDict()  # llguidance grammars, by key
        self._tokenizer_path = vllm_config.model_config.tokenizer
        self._tokenizer: Any = None
        self._pieces: tuple[bytes, ...] = ()

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        return self._tokenizer

    def _token_pieces(self, size: int) -> tuple[bytes, ...]:
        if not self._pieces:
            self._pieces = token_pieces(self._load_tokenizer(), size)
        return self._pieces

    def _llguidance_grammar(self, spec: dict[str, Any]) -> CompiledGrammar:
        """The grammar the API process compiled under llguidance, rebuilt here from its regex: a matcher
        over this process's vocabulary (built once from the same tokenizer) and the Index for later."""
        hit = self._matched.get(spec["key"])
        if hit is not None:
            self._matched.move_to_end(spec["key"])
            return hit
        from fcdistill.grammars.constraint import ExactLater
        from fcdistill.grammars.llguidance_masks import build_matcher
        from fcdistill.grammars.vocabulary import token_vocabulary

        vocab = token_vocabulary(self._load_tokenizer(), spec["fc_token"], spec["size"])
        if (vocab.size, vocab.eot_id, vocab.fc_id) != (spec["size"], spec["eot_id"], spec["fc_id"]):
            raise ValueError(f"the engine core's vocabulary ({vocab.size}, eot {vocab.eot_id}, FC {vocab.fc_id}) is "
                             f"not the API process's ({spec['size']}, eot {spec['eot_id']}, FC {spec['fc_id']})")
        regex = spec["regex"]
        grammar = CompiledGrammar(mode=spec["mode"], index=None, vocab=vocab, compile_ms=0.0,
                                  matcher=build_matcher(regex, vocab), close_bound=spec["close_bound"],
                                  later=ExactLater(regex, vocab, ("vllm-core", spec["key"])))
        self._matched[spec["key"]] = grammar
        while len(self._matched) > _INDEX_CACHE_SIZE:
            self._matched.popitem(last=False)
        return grammar

    def _seed(self, grammar: CompiledGrammar, index_bytes: bytes | None) -> None:
        """An Index the API process compiled for this grammar: used here instead of compiling it again."""
        if index_bytes is not None and grammar.later is not None and grammar.later.built() is None:
            grammar.later.seed(pickle.loads(index_bytes))  # bytes produced by our own API process

    def is_argmax_invariant(self) -> bool:
        return False  # it removes tokens, so greedy decoding must see it

    def new_req_logits_processor(self, params: Any) -> _RequestConstraint | None:
        spec = (params.extra_args or {}).get(EXTRA_KEY)
        if not spec:
            return None
        guard = LoopGuard(**spec["guard"]) if spec.get("guard") else None
        if spec.get("regex") is not None:
            grammar = self._llguidance_grammar(spec)
            self._seed(grammar, spec["index"])
            return _RequestConstraint(SequenceConstraint(grammar, spec.get("max_tokens"), guard))
        index, table = None, None
        if spec["index"] is not None or spec["key"] in self._indexes:
            hit = self._indexes.get(spec["key"])
            if hit is None:
                hit = pickle.loads(spec["index"])  # bytes produced by our own API process
                self._indexes[spec["key"]] = hit
                while len(self._indexes) > _INDEX_CACHE_SIZE:
                    self._indexes.popitem(last=False)
            else:
                self._indexes.move_to_end(spec["key"])
            index, table = hit
        vocab = TokenVocabulary(key=("vllm", spec["size"], ""), vocabulary=None, size=spec["size"],
                                eot_id=spec["eot_id"], fc_id=spec["fc_id"],
                                pieces=self._token_pieces(spec["size"]) if guard is not None else ())
        grammar = CompiledGrammar(mode=spec["mode"], index=index, vocab=vocab, compile_ms=0.0, table=table)
        return _RequestConstraint(SequenceConstraint(grammar, spec.get("max_tokens"), guard))
