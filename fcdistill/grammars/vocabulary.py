"""The tokenizer's vocabulary as outlines-core sees it, built once per tokenizer.

`outlines_core.Vocabulary.from_pretrained` asks the hub even for a local directory, so the vocabulary
is built from the loaded transformers tokenizer through outlines' own adapter (byte-level tokens
such as `Ġ` become the text they stand for). Special tokens are left out: inside a JSON string the
model must not be able to emit `<|im_start|>` or the FC token as one token.
"""

from __future__ import annotations

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


def token_vocabulary(tokenizer: Any, fc_token: str | None, logits_size: int | None = None) -> TokenVocabulary:
    """Cached per (tokenizer, vocabulary size, FC token)."""
    key = (getattr(tokenizer, "name_or_path", "") or str(id(tokenizer)), len(tokenizer), fc_token or "")
    with _lock:
        if key in _cache:
            return _cache[key]
    from outlines.backends.outlines_core import OutlinesCoreBackend
    from outlines.models.transformers import TransformerTokenizer
    from outlines_core import Vocabulary  # noqa: F401  (the type built below)

    adapter = TransformerTokenizer(tokenizer)
    eot_id = tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids) | {i for t, i in vocab.items() if t in tokenizer.get_added_vocab()}
    fc_id = vocab.get(fc_token) if fc_token else None
    plain = {t: i for t, i in vocab.items() if i not in special and i != fc_id}
    plain[tokenizer.eos_token] = eot_id  # popped again by the builder; marks EOS
    built = OutlinesCoreBackend.create_outlines_core_vocabulary(plain, eot_id, tokenizer.eos_token,
                                                                adapter.convert_token_to_string)
    size = max(logits_size or 0, max(vocab.values()) + 1)
    result = TokenVocabulary(key=key, vocabulary=built, size=size, eot_id=eot_id, fc_id=fc_id,
                             special_ids=frozenset(special))
    with _lock:
        _cache[key] = result
    return result
