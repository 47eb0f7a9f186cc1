"""A KV cache that grows into spare room instead of being copied at every decode step, and whose batch
changes (rows leaving, rows joining) move only the rows that change.

transformers' DynamicLayer appends a step's keys and values with `torch.cat`, which copies the whole
cache of every layer at every step: ~370 MB a step for 8 rows of 1,000 tokens of SmolLM2-135M in fp32,
each copy a fresh allocation (the server caps glibc's mmap threshold, so a fresh mmap with its page
faults). Here each layer keeps buffers with room to spare, in rows and in positions on both sides, and
`keys`/`values` are views of the live part: rows [0, rows), positions [start, start + n). So attention
and the engine see ordinary tensors, and:
- a decode step writes its positions in place after the view;
- `crop` (the engine dropping rejected draft tokens) moves the view's end back; the next step writes over
  what was cut;
- `keep_rows` (rows leaving the batch) moves only the rows that must fill a hole, from past the new end;
- `drop_leading` (padding columns no row uses any more) moves the view's start forward;
- `merge_rows` (rows joining) writes the new rows into spare rows, and where they are longer than the
  batch, moves the view's start back, zeroing what that exposes (left padding that is masked out: zeros,
  not whatever the buffer held, since a masked NaN still poisons attention).
Only when the buffers run out of room are they reallocated, with spare room again (25%, at least 64
positions a side; twice the rows). Whatever assigns `keys`/`values` from outside (transformers' reset,
beam reordering, offload) drops the buffers at once, so the replaced cache is freed then rather than at
the next step; the next update moves the new tensors into fresh buffers. A view returned by `update`
stays valid until the layer's next update or batch change. benchmarks/kv_cache_bench.py measures the
step time against DynamicCache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_FRACTION = 0.25
MIN_SPARE = 64
MIN_ROWS = 4


def compaction(keep: list[int]) -> list[int]:
    """The rows to keep (old indices, ascending), ordered so that each row stays at its index or, when
    it lies past the new end, fills a hole left by a row that went: new row j is old row order[j]. So
    no row is read after it was written over, and only the rows that fill holes move."""
    n = len(keep)
    staying = {i for i in keep if i < n}
    movers = iter(i for i in keep if i >= n)
    return [j if j in staying else next(movers) for j in range(n)]


class GrowingLayer(DynamicLayer):
    """A full-attention layer's keys and values, [rows, heads, n, dim], as views of larger buffers."""

    _keys: Any = None
    _values: Any = None
    _keys_buf: Any = None  # [row capacity, heads, position capacity, dim]; None whenever keys is not a view of it
    _values_buf: Any = None
    _start: int = 0  # the view's first position in the buffers

    @property
    def keys(self) -> Any:
        return self._keys

    @keys.setter
    def keys(self, tensor: Any) -> None:
        self._keys, self._keys_buf, self._start = tensor, None, 0

    @property
    def values(self) -> Any:
        return self._values

    @values.setter
    def values(self, tensor: Any) -> None:
        self._values, self._values_buf, self._start = tensor, None, 0

    @property
    def _buffered(self) -> bool:
        return self._keys_buf is not None and self._values_buf is not None

    def _rows_n(self) -> tuple[int, int]:
        return self._keys.shape[0], (self._keys.shape[-2] if self._keys.numel() else 0)

    def _view(self, rows: int, start: int, end: int) -> None:
        self._start = start
        self._keys, self._values = self._keys_buf[:rows, :, start:end, :], self._values_buf[:rows, :, start:end, :]

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, n = key_states.shape[0], (self._keys.shape[-2] if self._keys.numel() else 0)
        end = n + key_states.shape[-2]
        if not self._buffered or rows > self._keys_buf.shape[0] or self._start + end > self._keys_buf.shape[-2]:
            self._regrow(key_states, rows, n, end)
        s = self._start
        self._keys_buf[:rows, :, s + n:s + end, :] = key_states
        self._values_buf[:rows, :, s + n:s + end, :] = value_states
        self._view(rows, s, s + end)
        return self._keys, self._values

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions (transformers' convention: a negative count),
        keeping the buffers."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of positions to remove, not {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if not self._buffered:
            super().crop(tokens_to_remove)
            return
        rows, n = self._rows_n()
        self._view(rows, self._start, self._start + max(0, n + tokens_to_remove))

    def keep_rows(self, order: list[int]) -> None:
        """Keep old rows `order` as the new rows 0..len-1 (`compaction` makes such an order: each row in
        place or moving from past the new end); in the buffers only the rows that move are copied."""
        if not self.is_initialized or not order:
            return
        if not self._buffered or any(i < len(order) and i != j for j, i in enumerate(order)):
            idx = torch.tensor(order, device=self._keys.device)
            self.keys, self.values = self._keys.index_select(0, idx), self._values.index_select(0, idx)
            return
        rows, n = self._rows_n()
        s = self._start
        for j, i in enumerate(order):
            if i != j:
                self._keys_buf[j, :, s:s + n] = self._keys_buf[i, :, s:s + n]
                self._values_buf[j, :, s:s + n] = self._values_buf[i, :, s:s + n]
        self._view(len(order), s, s + n)

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions of every row (padding no row attends to)."""
        if count <= 0 or not self.is_initialized:
            return
        rows, n = self._rows_n()
        if self._buffered:
            self._view(rows, self._start + count, self._start + n)
        else:
            self.keys, self.values = self._keys[..., count:, :], self._values[..., count:, :]

    def merge_rows(self, keys: Any, values: Any) -> None:
        """Append rows whose last position is this layer's last position, left-padding with zeros
        whichever side is shorter."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        rows, n = self._rows_n()
        add, m = keys.shape[0], keys.shape[-2]
        width = max(n, m)
        if not self._buffered or rows + add > self._keys_buf.shape[0] or self._start < width - n:
            self._regrow(keys, rows + add, n, n, left=width - n)
        end = self._start + n
        start = end - width
        for buf, new in ((self._keys_buf, keys), (self._values_buf, values)):
            buf[:rows, :, start:end - n] = 0
            buf[rows:rows + add, :, start:end - m] = 0
            buf[rows:rows + add, :, end - m:end] = new
        self._view(rows + add, start, end)

    def _regrow(self, like: Any, rows: int, n: int, end: int, left: int = 0) -> None:
        """New buffers for `rows` rows (room for twice as many) and positions [0, end) after at least
        `left` positions (and spare room again), with spare room past end; the current n positions of
        the current rows move in."""
        side = max(MIN_SPARE, int(end * SPARE_FRACTION))
        start = left + side
        shape = (max(MIN_ROWS, 2 * rows), like.shape[1], start + end + side, like.shape[-1])
        keys_buf, values_buf = like.new_empty(shape), like.new_empty(shape)
        if n:
            have = self._keys.shape[0]
            keys_buf[:have, :, start:start + n] = self._keys
            values_buf[:have, :, start:start + n] = self._values
        self._keys_buf, self._values_buf = keys_buf, values_buf
        self._start = start


class GrowingCache(DynamicCache):
    """DynamicCache whose layers are GrowingLayers, created lazily one per attention layer (as a
    DynamicCache made without a config does): full attention only, no offloading."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
