"""Prompt lookup's drafts: what followed the latest earlier occurrence of the longest recurring suffix."""

from __future__ import annotations

from fcdistill.serve.engines.prompt_lookup import propose


def test_the_longest_recurring_suffix_decides_and_its_latest_occurrence_wins():
    #          0  1  2  3  4  5  6  7  8  9 10 11 12
    context = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7]
    assert propose(context, 3) == [8, 9, 1]  # "5 6 7" recurs (at 0); "6 7" alone would pick the later 2, 3
    assert propose([1, 2, 9, 2, 4, 2], 2) == [4, 2]  # suffix "2": its latest earlier occurrence is at 3
    assert propose(context, 20) == [8, 9, 1, 6, 7, 2, 3, 5, 6, 7]  # up to the end of the context


def test_no_draft_without_a_recurrence_or_room():
    assert propose([1, 2, 3, 4], 5) == []
    assert propose([4], 5) == []
    assert propose([], 5) == []
    assert propose([1, 2, 1], 0) == []
    assert propose([3, 1, 2, 3], 4, min_ngram=2) == []  # only a 1-gram recurs
