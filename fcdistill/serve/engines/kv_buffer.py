"""A KV cache that grows into spare room instead of being copied at every decode step.

transformers' DynamicLayer appends a step's keys and values with `torch.cat`, which copies the whole
cache of every layer at every step: ~370 MB a step for 8 rows of 1,000 tokens of SmolLM2-135M in fp32,
each copy a fresh allocation (the server caps glibc's mmap threshold, so a fresh mmap with its page
faults). Here each layer keeps a buffer with room to spare (25%, at least 64 positions) and writes new
positions in place; `keys`/`values` are views of its first n positions, so attention and the engine see
ordinary tensors. benchmarks/kv_cache_bench.py measures the step time against DynamicCache.

`crop` (the engine dropping rejected draft tokens) keeps the buffers: the next update writes over what
was cut. Whatever assigns `keys`/`values` from outside (the engine's batch merge, row selection, dropping
unused padding columns; transformers' reset, offload) drops the buffers at once, so the replaced cache is
freed then rather than at the next step; the next update moves the new tensors into a fresh buffer.
A view returned by `update` stays valid until the layer's next update or assignment.
"""

from __future__ import annotations

from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_FRACTION = 0.25
MIN_SPARE = 64


class GrowingLayer(DynamicLayer):
    """A full-attention layer's keys and values, [rows, heads, n, dim], as views of larger buffers."""

    _keys: Any = None
    _values: Any = None
    _keys_buf: Any = None  # None whenever keys is not a view of it
    _values_buf: Any = None

    @property
    def keys(self) -> Any:
        return self._keys

    @keys.setter
    def keys(self, tensor: Any) -> None:
        self._keys, self._keys_buf = tensor, None

    @property
    def values(self) -> Any:
        return self._values

    @values.setter
    def values(self, tensor: Any) -> None:
        self._values, self._values_buf = tensor, None

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self._keys.shape[-2] if self._keys.numel() else 0
        end = n + key_states.shape[-2]
        if self._keys_buf is None or self._values_buf is None or end > self._keys_buf.shape[-2]:
            self._regrow(key_states, value_states, n, end)
        self._keys_buf[..., n:end, :] = key_states
        self._values_buf[..., n:end, :] = value_states
        self._keys, self._values = self._keys_buf[..., :end, :], self._values_buf[..., :end, :]
        return self._keys, self._values

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions (transformers' convention: a negative count),
        keeping the buffers."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, not {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self._keys_buf is None or self._values_buf is None:
            super().crop(tokens_to_remove)
            return
        end = self._keys.shape[-2] + tokens_to_remove
        self._keys, self._values = self._keys_buf[..., :end, :], self._values_buf[..., :end, :]

    def _regrow(self, key_states: Any, value_states: Any, n: int, end: int) -> None:
        """New buffers with room past `end`, holding the current n positions."""
        room = end + max(MIN_SPARE, int(end * SPARE_FRACTION))
        keys_buf = key_states.new_empty((*key_states.shape[:2], room, key_states.shape[-1]))
        values_buf = value_states.new_empty((*value_states.shape[:2], room, value_states.shape[-1]))
        if n:
            keys_buf[..., :n, :] = self._keys
            values_buf[..., :n, :] = self._values
        self._keys_buf, self._values_buf = keys_buf, values_buf


class GrowingCache(DynamicCache):
    """DynamicCache whose layers are GrowingLayers, created lazily one per attention layer (as a
    DynamicCache made without a config does): full attention only, no offloading."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
