"""How far each state of a compiled grammar is from a complete answer, and which tokens get closer.

The Index only says which tokens are allowed; to end every answer before its token budget runs out,
the constraint also needs, for each state, the fewest tokens to a final state (reverse BFS over the
Index's transitions) and, when the budget or the loop guard narrows the choice, the allowed tokens
whose next state is within a given distance. Those are kept per state as one token array sorted by
next-state distance, so narrowing is a slice, not a scan of the vocabulary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

UNREACHABLE = 1 << 30  # distance of a state no token path leads from to a final state


@dataclass(frozen=True)
class CloseTable:
    """Per-state distances to a final state, in grammar tokens (end-of-turn not counted)."""

    dist: dict[int, int]
    # state -> (offset into `tokens`, ((next-state distance, end offset), ...) ascending): the state's
    # tokens sorted by where they lead; end-of-turn is left out (the constraint allows it at final states)
    groups: dict[int, tuple[int, tuple[tuple[int, int], ...]]]
    tokens: np.ndarray
    start: int  # distance of the initial state: the shortest complete answer

    def farthest_next(self, state: int) -> int:
        """The largest next-state distance any allowed token leads to; -1 when only end-of-turn is left."""
        entry = self.groups.get(state)
        return entry[1][-1][0] if entry and entry[1] else -1

    def within(self, state: int, bound: int) -> np.ndarray:
        """The allowed tokens (end-of-turn aside) whose next state is at most `bound` from a final state."""
        entry = self.groups.get(state)
        if entry is None:
            return self.tokens[:0]
        offset, spans = entry
        end = offset
        for distance, stop in spans:
            if distance > bound:
                break
            end = stop
        return self.tokens[offset:end]


def build_close_table(index: Any, eot_id: int) -> CloseTable:
    """Distances by reverse BFS from the final states, then each state's tokens grouped by distance."""
    transitions: dict[int, dict[int, int]] = index.get_transitions()
    finals = set(index.get_final_states())
    predecessors: dict[int, set[int]] = {}
    for state, row in transitions.items():
        for nxt in set(row.values()):  # a few distinct next states per row, however many tokens
            predecessors.setdefault(nxt, set()).add(state)
    dist = dict.fromkeys(finals, 0)
    queue = deque(finals)
    while queue:
        state = queue.popleft()
        for prev in predecessors.get(state, ()):
            if prev not in dist:
                dist[prev] = dist[state] + 1
                queue.append(prev)
    known = set(transitions) | set(predecessors) | finals
    lookup = np.full(max(known) + 1, UNREACHABLE, dtype=np.int64)
    for state, d in dist.items():
        lookup[state] = d
    chunks: list[np.ndarray] = []
    groups: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {}
    offset = 0
    for state, row in transitions.items():
        tokens = np.fromiter(row.keys(), dtype=np.int32, count=len(row))
        nexts = lookup[np.fromiter(row.values(), dtype=np.int64, count=len(row))]
        keep = tokens != eot_id
        tokens, nexts = tokens[keep], nexts[keep]
        order = np.argsort(nexts, kind="stable")
        tokens, nexts = tokens[order], nexts[order]
        ends = np.append(np.flatnonzero(np.diff(nexts)) + 1, len(nexts)) if len(nexts) else np.zeros(0, dtype=np.int64)
        groups[state] = (offset, tuple(zip(nexts[ends - 1].tolist(), (ends + offset).tolist())))
        chunks.append(tokens)
        offset += len(tokens)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return CloseTable(dist={s: dist.get(s, UNREACHABLE) for s in known}, groups=groups,
                      tokens=tokens.astype(np.min_scalar_type(int(tokens.max(initial=0)))),  # uint16 for a <64k vocabulary
                      start=dist.get(index.get_initial_state(), UNREACHABLE))
