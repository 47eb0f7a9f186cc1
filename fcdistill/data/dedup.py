"""Duplicate removal, contamination filtering against the eval split, and a stratified train/val split.

Shared by the data stage (BFCL splits, augmentation) and the teacher stages (`fcd synth`, `fcd verify`);
`bfcl.eval_index` builds the EvalIndex of a data directory.

- exact duplicates: the same normalized text (NFKC, case, whitespace);
- near duplicates: MinHash LSH (datasketch) over character 5-gram shingles proposes candidates
  (from a band below the threshold, for recall), each confirmed with the exact Jaccard similarity,
  so the threshold means what it says;
- contamination: an id (the example's, its seeds', its source's) in the eval manifest, or a word
  13-gram shared with an eval question (a query shorter than 13 words but at least `min_words`
  long is contaminated when it occurs whole inside an eval question);
- split: stratified by function names and argument keys, seeded, with an exact overall fraction.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Any

from fcdistill.tools import ToolCall

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def question_text(messages: list[dict[str, Any]]) -> str:
    """The user turns of a conversation: what contamination checks compare."""
    return "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "user")


def char_shingles(text: str, k: int = 5) -> set[str]:
    t = normalize(text)
    if len(t) <= k:
        return {t}
    return {t[i:i + k] for i in range(len(t) - k + 1)}


class DuplicateIndex:
    """Exact and near-duplicate detection in insertion order (the first occurrence is kept)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        # LSH only proposes candidates; each is confirmed with the exact Jaccard. Retrieval at the
        # threshold itself is a coin flip by design, so candidates are drawn from a lower band.
        self._lsh = MinHashLSH(threshold=max(0.1, min(0.9, threshold - 0.15)), num_perm=num_perm)
        self._exact: dict[str, str] = {}
        self._shingles: dict[str, set[str]] = {}

    def _minhash(self, shingles: set[str]) -> Any:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
        return m

    def check(self, ident: str, text: str, add: bool = True) -> tuple[str, str | None, float]:
        """("unique" | "exact" | "near", the id it duplicates, Jaccard similarity); adds it when unique."""
        norm = normalize(text)
        if norm in self._exact:
            return "exact", self._exact[norm], 1.0
        sh = char_shingles(text, self.shingle)
        mh = self._minhash(sh)
        best, best_j = None, 0.0
        for cand in self._lsh.query(mh):
            other = self._shingles[cand]
            j = len(sh & other) / len(sh | other)
            if j >= self.threshold and (j > best_j or (j == best_j and str(cand) < str(best))):
                best, best_j = cand, j
        if best is not None:
            return "near", best, best_j
        if add:
            self._exact[norm] = ident
            self._shingles[ident] = sh
            self._lsh.insert(ident, mh)
        return "unique", None, 0.0


class EvalIndex:
    """What the eval split holds: ids and questions, for contamination checks."""

    def __init__(self, eval_ids: set[str], texts: dict[str, str], n: int = 13, min_words: int = 8):
        self.ids = set(eval_ids)
        self.n = n
        self.min_words = min_words
        self._tokens = {i: words(t) for i, t in texts.items()}
        self._by_len: dict[int, dict[tuple[str, ...], str]] = {}

    def _grams(self, length: int) -> dict[tuple[str, ...], str]:
        """All word `length`-grams of the eval questions (built once per length, on demand)."""
        if length not in self._by_len:
            grams: dict[tuple[str, ...], str] = {}
            for ident, toks in sorted(self._tokens.items()):
                for i in range(len(toks) - length + 1):
                    grams.setdefault(tuple(toks[i:i + length]), ident)
            self._by_len[length] = grams
        return self._by_len[length]

    def check(self, ids: list[str], text: str) -> str | None:
        """Why the example is contaminated, or None."""
        for i in ids:
            if i in self.ids:
                return f"id {i} is in the eval split"
        toks = words(text)
        if len(toks) >= self.n:
            grams = self._grams(self.n)
            for i in range(len(toks) - self.n + 1):
                hit = grams.get(tuple(toks[i:i + self.n]))
                if hit is not None:
                    return f"shares a {self.n}-gram with eval item {hit}: {' '.join(toks[i:i + self.n])!r}"
        elif len(toks) >= self.min_words:
            hit = self._grams(len(toks)).get(tuple(toks))
            if hit is not None:
                return f"occurs whole in eval item {hit}"
        return None


def stratum(calls: list[ToolCall]) -> str:
    """Function names with their argument keys: `f(a,b)+g(c)`; `<no call>` for irrelevance."""
    if not calls:
        return "<no call>"
    return "+".join(sorted(f"{c.name}({','.join(sorted(c.arguments))})" for c in calls))


def stratified_split(items: list[tuple[str, str]], val_fraction: float, seed: int) -> dict[str, str]:
    """(id, stratum) pairs -> id: "train" | "val".

    Items are ordered by stratum, shuffled within it (seeded), and every 1/f-th goes to val from a
    random offset: the overall val share is exact (+-1) and each stratum gets its proportional share.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    rng = random.Random(seed)
    by: dict[str, list[str]] = {}
    for ident, s in sorted(items):
        by.setdefault(s, []).append(ident)
    order: list[str] = []
    for s in sorted(by):
        ids = by[s]
        rng.shuffle(ids)
        order += ids
    offset = rng.random()
    out = {}
    for i, ident in enumerate(order):
        take = int((i + 1) * val_fraction + offset) > int(i * val_fraction + offset)
        out[ident] = "val" if take else "train"
    return out
