"""A KV cache that grows into spare room instead of being copied at every decode step.

transformers' DynamicLayer appends a step's keys and values with `torch.cat`, which copies the whole
cache of every layer at every step: with 8 rows of 1,000-token agent prompts that is hundreds of MB a
step, as much time as the step's matmuls on a 2-core CPU. Here each layer keeps a buffer with room to
spare (25% and at least 64 positions) and writes new positions in place; `keys`/`values` are views of
its first n positions, so attention, `crop` and the prefix cache see ordinary tensors.

Whatever replaces `keys`/`values` from outside (the engine's batch merge, row selection, dropping
unused padding columns) leaves them no longer a view of the buffer's start; the next update notices
and moves them into a fresh buffer once.
"""

from __future__ import annotations

from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_FRACTION = 0.25
MIN_SPARE = 64


class GrowingLayer(DynamicLayer):
    """A full-attention layer's keys and values, [rows, heads, n, dim], as views of a larger buffer."""

    _keys_buf: Any = None
    _values_buf: Any = None

    def _owns_current(self) -> bool:
        """Whether keys/values are still the first n positions of this layer's buffers."""
        buf = self._keys_buf
        return (buf is not None and self.keys.data_ptr() == buf.data_ptr() and self.keys.shape[:2] == buf.shape[:2]
                and self.keys.stride() == buf.stride() and self.values.data_ptr() == self._values_buf.data_ptr())

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        end = n + key_states.shape[-2]
        if not (n and self._owns_current()) or end > self._keys_buf.shape[-2]:
            self._regrow(key_states, value_states, n, end)
        self._keys_buf[..., n:end, :] = key_states
        self._values_buf[..., n:end, :] = value_states
        self.keys, self.values = self._keys_buf[..., :end, :], self._values_buf[..., :end, :]
        return self.keys, self.values

    def _regrow(self, key_states: Any, value_states: Any, n: int, end: int) -> None:
        """New buffers with room past `end`, holding the current n positions."""
        room = end + max(MIN_SPARE, int(end * SPARE_FRACTION))
        keys_buf = key_states.new_empty((*key_states.shape[:2], room, key_states.shape[-1]))
        values_buf = value_states.new_empty((*value_states.shape[:2], room, value_states.shape[-1]))
        if n:
            keys_buf[..., :n, :] = self.keys
            values_buf[..., :n, :] = self.values
        self._keys_buf, self._values_buf = keys_buf, values_buf


class GrowingCache(DynamicCache):
    """DynamicCache whose layers are GrowingLayers (created lazily, one per attention layer, as
    DynamicCache does); a model given one treats it as the DynamicCache it is."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
