"""BFCL's group and overall scores: the published V4 leaderboard's numbers, rebuilt from its per-category columns."""

from __future__ import annotations

import pytest

from fcdistill.eval.leaderboard import bfcl_scores

# Per-category accuracies of three models on the V4 board of 2025-12-16 (data_overall, data_non_live and
# data_live tables), with the board's overall, non-live, live and multi-turn scores.
ORDER = ("simple_python simple_java simple_javascript multiple parallel parallel_multiple irrelevance live_simple "
         "live_multiple live_parallel live_parallel_multiple live_irrelevance multi_turn_base multi_turn_miss_func "
         "multi_turn_miss_param multi_turn_long_context web_search_base web_search_no_snippet memory_kv memory_vector "
         "memory_rec_sum").split()
BOARD = {
    "Claude-Opus-4-5-20251101 (FC)": (
        [96.5, 60, 74, 95.5, 93.5, 88.5, 85.83, 86.43, 78.16, 87.5, 75, 83.6, 81, 64, 58, 70.5, 84, 85, 70.97, 72.9, 77.42],
        77.47, 88.58, 79.79, 68.38),
    "Qwen3-8B (FC)": (
        [95.5, 61, 62, 96.5, 92, 89, 81.67, 84.5, 79.68, 75, 79.17, 76.47, 50.5, 42, 40, 34.5, 15, 9, 5.16, 7.1, 31.61],
        42.57, 87.58, 80.53, 41.75),
    "Hammer2.1-7b (FC)": (
        [93.5, 60, 64, 92.5, 91, 86, 91.67, 66.67, 69.99, 75, 75, 88.57, 24, 28.5, 21.5, 21.5, 0, 0, 0, 0, 0],
        31.67, 85.5, 69.5, 23.87),
}
LIVE_COUNTS = {"live_simple": 258, "live_multiple": 1053, "live_parallel": 16, "live_parallel_multiple": 24}


@pytest.mark.parametrize("model", BOARD)
def test_leaderboard_scores_rebuilt_from_categories(model):
    accs, overall, non_live, live, multi_turn = BOARD[model]
    cats = {c: {"accuracy": a / 100, "answered": LIVE_COUNTS.get(c, 100)} for c, a in zip(ORDER, accs)}
    s = bfcl_scores(cats)
    # the board prints two decimals of a percent
    assert s["overall"]["accuracy"] * 100 == pytest.approx(overall, abs=0.01)
    assert s["groups"]["non_live"]["accuracy"] * 100 == pytest.approx(non_live, abs=0.01)
    assert s["groups"]["live"]["accuracy"] * 100 == pytest.approx(live, abs=0.01)
    assert s["groups"]["multi_turn"]["accuracy"] * 100 == pytest.approx(multi_turn, abs=0.01)
    assert s["overall"]["missing"] == [] and s["overall"]["accuracy_run"] == s["overall"]["accuracy"]


def test_a_partial_run_names_what_is_missing_and_counts_it_zero_only_on_the_board_figure():
    cats = {"simple_python": {"accuracy": 0.6, "answered": 200}, "multiple": {"accuracy": 0.5, "answered": 100},
            "irrelevance": {"accuracy": 0.9, "answered": 120}, "multi_turn_base": {"accuracy": 0.1, "answered": 100}}
    s = bfcl_scores(cats)
    g = s["groups"]
    assert g["non_live"]["missing"] == ["simple_java", "simple_javascript", "parallel", "parallel_multiple"]
    assert g["non_live"]["accuracy"] == pytest.approx((0.6 / 3 + 0.5) / 4)
    assert g["non_live"]["accuracy_run"] == pytest.approx((0.6 + 0.5) / 2)
    assert g["live"]["accuracy"] == 0 and g["live"]["accuracy_run"] is None
    assert g["multi_turn"]["accuracy"] == pytest.approx(0.1 / 4) and g["multi_turn"]["accuracy_run"] == pytest.approx(0.1)
    run = (10 * 0.55 + 10 * 0.9 + 30 * 0.1) / 50
    assert s["overall"]["accuracy_run"] == pytest.approx(run)
    assert "web_search_base" in s["overall"]["missing"] and "live_simple" in s["overall"]["missing"]
