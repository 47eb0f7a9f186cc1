"""llguidance as the mask backend (`fcd serve --grammar-backend llguidance`): the same regex, no
up-front automaton.

outlines-core compiles a tool set's regex into an Index over the whole vocabulary before the first
token (hundreds of milliseconds to seconds a tool set, and every BFCL item brings a new one);
llguidance builds a matcher in about a millisecond and computes each step's mask lazily, walking the
token trie. The matcher is built from the very regex outlines compiles, over the very token bytes of
`TokenVocabulary` (special tokens and the FC token match no text), so the language is the same.
One difference, by llguidance's design: where the grammar forces bytes (`{"name":"` after `[` in a
one-tool set), it allows only the tokenizer's own split of them, so its masks are a subset of
outlines' (never empty where outlines' is not).
"""

from __future__ import annotations

import threading
from typing import Any

from fcdistill.grammars.vocabulary import TokenVocabulary

_lock = threading.Lock()
_tokenizers: dict[tuple[str, int, str], Any] = {}


class _Pieces:
    """What llguidance's TokenizerWrapper reads: each token's bytes, end-of-turn as EOS, and a
    tokenize call (it tokenizes forced text to find canonical splits)."""

    def __init__(self, vocab: TokenVocabulary, encode: Any):
        never = set(vocab.special_ids) | ({vocab.fc_id} if vocab.fc_id is not None else set())
        self.special_token_ids = [i for i, raw in enumerate(vocab.pieces) if i in never or not raw]
        special = set(self.special_token_ids)
        # llguidance's convention for special tokens: bytes that start with 0xFF never match text
        self.tokens = [b"\xff[%d]" % i if i in special else raw for i, raw in enumerate(vocab.pieces)]
        self.eos_token_id = vocab.eot_id
        self.bos_token_id = None
        self._encode = encode
        self._special = special
        self._by_byte = {raw[0]: i for i, raw in enumerate(vocab.pieces) if len(raw) == 1 and i not in special}

    def __call__(self, text: str | bytes) -> list[int]:
        """The tokenizer's split; one-byte tokens where it would use a token that matches no text."""
        raw = text if isinstance(text, bytes) else text.encode()
        ids = list(self._encode(raw.decode("utf-8", errors="replace")))
        if any(i in self._special or i >= len(self.tokens) for i in ids) or b"".join(self.tokens[i] for i in ids) != raw:
            ids = [self._by_byte[b] for b in raw if b in self._by_byte]
        return ids


def ll_tokenizer(vocab: TokenVocabulary) -> Any:
    """The LLTokenizer over this vocabulary, built once (a few hundred ms for a 49k vocabulary)."""
    with _lock:
        if vocab.key in _tokenizers:
            return _tokenizers[vocab.key]
    from llguidance import LLTokenizer, TokenizerWrapper

    if vocab.encode is None or not vocab.pieces:
        raise ValueError("the llguidance backend needs the vocabulary's token bytes and the tokenizer's encode")
    built = LLTokenizer(TokenizerWrapper(_Pieces(vocab, vocab.encode)), n_vocab=vocab.size, eos_token=vocab.eot_id)
    with _lock:
        return _tokenizers.setdefault(vocab.key, built)


def build_matcher(regex: str, vocab: TokenVocabulary) -> Any:
    """A matcher at the grammar's start (copied for each sequence), or ValueError with llguidance's reason."""
    from llguidance import LLMatcher

    matcher = LLMatcher(ll_tokenizer(vocab), LLMatcher.grammar_from_regex(regex), log_level=0)
    if matcher.is_error():
        raise ValueError(matcher.get_error())
    return matcher


def fill_bitmask(matcher: Any, bitmask: Any) -> None:
    """This step's allowed tokens into a (1, words) int32 tensor, bit j of word i for token 32*i + j
    (outlines-core's layout too)."""
    import llguidance.torch

    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
