"""Draft tokens for speculative decoding by prompt lookup (n-gram speculation, as vLLM's `ngram` method
and transformers' `prompt_lookup_num_tokens`).

A tool call copies most of its argument values from the request (a city, a date, a number the user
typed), and an answer after a tool result repeats that result. So the tokens that followed the latest
earlier occurrence of the sequence's last few tokens are a good guess at what comes next; the engine
feeds the guess with the sampled token in one forward pass and keeps the longest prefix the model would
have chosen itself (greedy requests only, so outputs equal step-by-step decoding). No draft model, no
extra memory: a guess costs only the wider forward pass, which on CPU is far cheaper per token than a
pass of its own.
"""

from __future__ import annotations

import numpy as np

MAX_NGRAM = 3
MIN_NGRAM = 1


def propose(context: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens, n from
    max_ngram down to min_ngram (the longest suffix that recurs wins); [] when none recurs."""
    if k <= 0 or len(context) <= min_ngram:
        return []
    ids = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every n-gram that has a successor
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start:start + k].tolist()
    return []
