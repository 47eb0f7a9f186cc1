"""The tokenizer's vocabulary as outlines-core sees it, built once per tokenizer.

`outlines_core.Vocabulary.from_pretrained` asks the hub even for a local directory, so the vocabulary
is built from the loaded transformers tokenizer through outlines' own adapter (byte-level tokens
such as `Ġ` become the text they stand for), keyed by bytes so that pieces of multi-byte
characters take part too. Special tokens are left out: inside a JSON string the
model must not be able to emit `<|im_start|>` or the FC token as one token. The same bytes, by id,
are what the loop guard reads the generated JSON from (`token_pieces`).
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from typing import Any

_lock = threading.Lock()
_cache: dict[tuple[str, int, str], TokenVocabulary] = {}


@dataclass
class TokenVocabulary:
    """outlines-core Vocabulary plus the ids the constraint state machine needs."""

    key: tuple[str, int, str]
    vocabulary: Any  # outlines_core.Vocabulary, end-of-turn as its EOS
    size: int  # logits width
    eot_id: int
    fc_id: int | None
    special_ids: frozenset[int] = field(default_factory=frozenset)
    pieces: tuple[bytes, ...] = ()  # bytes of each token id, b"" for special ones (see token_pieces)
    encode: Any = None  # text -> token ids, special tokens' text split as text (llguidance splits forced text with it)

    @functools.cached_property
    def single_bytes(self) -> frozenset[int]:
        """The byte values that have a one-byte token: what bounds tokens by bytes (regex_bound)."""
        return frozenset(raw[0] for raw in self.pieces if len(raw) == 1)


def token_vocabulary(tokenizer: Any, fc_token: str | None, logits_size: int | None = None) -> TokenVocabulary:
    """Cached per (tokenizer, vocabulary size, FC token)."""
    key = (getattr(tokenizer, "name_or_path", "") or str(id(tokenizer)), len(tokenizer), fc_token or "")
    with _lock:
        if key in _cache:
            return _cache[key]
    from outlines_core import Vocabulary

    vocab = tokenizer.get_vocab()
    fc_id = vocab.get(fc_token) if fc_token else None
    size = max(logits_size or 0, max(vocab.values()) + 1)
    pieces = token_pieces(tokenizer, size)
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, raw in enumerate(pieces):
        if raw and token_id != fc_id:
            by_bytes.setdefault(raw, []).append(token_id)
    result = TokenVocabulary(key=key, vocabulary=Vocabulary(tokenizer.eos_token_id, by_bytes), size=size,
                             eot_id=tokenizer.eos_token_id, fc_id=fc_id, special_ids=frozenset(special_ids(tokenizer)),
                             pieces=pieces, encode=_plain_encoder(tokenizer))
    with _lock:
        _cache[key] = result
    return result


def _plain_encoder(tokenizer: Any) -> Any:
    """text -> ids with special tokens' text split like any other (an enum value may spell `<tool_call>`),
    through a copy of the fast tokenizer's backend: transformers' own `split_special_tokens` flips a flag
    on the shared backend at every call, which would race with the server encoding prompts in other
    threads. None for a tokenizer without a fast backend (llguidance needs one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.encode_special_tokens = True  # set once, before any thread uses it

    def encode(text: str) -> list[int]:
        return own.encode(text, add_special_tokens=False).ids

    return encode


def special_ids(tokenizer: Any) -> set[int]:
    """Special and added tokens: never part of a constrained JSON value."""
    added = tokenizer.get_added_vocab()
    return set(tokenizer.all_special_ids) | set(added.values())


def token_pieces(tokenizer: Any, size: int) -> tuple[bytes, ...]:
    """The bytes each token id stands for, b"" for special tokens and ids the tokenizer does not have."""
    from outlines.models.transformers import TransformerTokenizer

    adapter = TransformerTokenizer(tokenizer)
    skip = special_ids(tokenizer)
    pieces = [b""] * size
    for token, token_id in tokenizer.get_vocab().items():
        if token_id not in skip and token_id < size:
            pieces[token_id] = token_bytes(token, adapter.convert_token_to_string) or b""
    return tuple(pieces)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(token: str, to_text: Any) -> bytes | None:
    """The bytes a token stands for. Byte-level BPE pieces of a multi-byte character (and
    sentencepiece's `<0xNN>` tokens) decode to U+FFFD as text, so they are mapped through the byte
    alphabet instead: without them no regex with non-ASCII text (a Korean enum) could be matched."""
    text = to_text(token)
    if "\ufffd" not in text:
        return text.encode("utf-8")
    m = _BYTE_TOKEN.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    unicode_to_byte = _byte_alphabet()
    if all(ch in unicode_to_byte for ch in token):
        return bytes(unicode_to_byte[ch] for ch in token)
    return None


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the GPT-2 byte alphabet

    return {u: b for b, u in bytes_to_unicode().items()}
