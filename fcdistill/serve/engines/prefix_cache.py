"""The hf engine's prefix cache: the KV of recent prompts, so that a request sharing a prompt's start
(the system turn with its tools, earlier turns of a conversation) computes only the rest.

Function calling resends the same tool definitions with every request, and an agent resends the
whole conversation every turn: most of a prompt has been seen before. Entries are whole prompts of
one adapter (LoRA changes the keys and values), as token ids with their per-layer keys and values
computed without padding at positions 0..n-1. A new prompt reuses the longest common token prefix
with any entry of its adapter (at most all but its last token, which must be computed for the next
token's logits). Entries are bounded by memory and dropped least recently used first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MIN_REUSE = 16  # tokens: below this the copy costs more than the prefill it saves


@dataclass
class _Entry:
    adapter: str | None
    ids: Any  # torch.LongTensor [n]
    layers: list[tuple[Any, Any]]  # per layer (keys, values), [1, heads, n, dim]
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()  # the scheduler writes; /metrics reads
        self.bytes = 0
        self.computed = 0  # prompt tokens run through the model
        self.reused = 0  # prompt tokens whose keys and values came from here
        self.hits = 0
        self.misses = 0

    def lookup(self, adapter: str | None, ids: list[int]) -> tuple[int, list[tuple[Any, Any]] | None]:
        """(n, per-layer keys and values of the first n tokens) of the longest usable cached prefix;
        (0, None) when none reaches MIN_REUSE."""
        import torch

        want = torch.tensor(ids)
        best, best_key = 0, None
        with self._lock:
            for key, e in self._entries.items():
                if e.adapter != adapter:
                    continue
                m = min(len(e.ids), len(ids) - 1)
                if m <= best:
                    continue
                diff = (e.ids[:m] != want[:m]).nonzero()
                n = int(diff[0]) if len(diff) else m
                if n > best:
                    best, best_key = n, key
            if best_key is None or best < MIN_REUSE:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(best_key)
            entry = self._entries[best_key]
            self.hits += 1
        return best, [(k[..., :best, :], v[..., :best, :]) for k, v in entry.layers]

    def store(self, adapter: str | None, ids: list[int], layers: list[tuple[Any, Any]], copy: bool = True) -> None:
        """Keep a prompt's keys and values: copied (the running batch goes on extending its own), unless
        `copy` is False (they are the caller's own fresh tensors)."""
        import torch

        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.max_bytes:
            return
        kept = [(k.detach().clone(), v.detach().clone()) for k, v in layers] if copy else list(layers)
        with self._lock:
            # a prompt that extends a cached one replaces it: its keys and values hold the older ones
            for key in [key for key, e in self._entries.items() if e.adapter == adapter and len(e.ids) <= len(ids)
                        and e.ids.tolist() == ids[:len(e.ids)]]:
                self.bytes -= self._entries.pop(key).nbytes
            self._entries[self._next] = _Entry(adapter, torch.tensor(ids), kept, nbytes)
            self._next += 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1].nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "computed": self.computed,
                    "reused": self.reused, "hits": self.hits, "misses": self.misses}
