"""Pure statistics: percentiles, summaries, slopes, rates from token timestamps."""
import math

import pytest

from scripts.proof.stats import percentile, rates_from_token_times, slope, summarise


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 95) == 10
    assert percentile([1, 2, 3, 4, 5], 25) == 2
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_median_spread_and_dropped_nan():
    s = summarise([10, 12, float("nan"), None, 8, 10])
    assert s.n == 4 and s.median == 10 and s.min == 8 and s.max == 12
    assert s.spread == pytest.approx((s.p75 - s.p25) / 10)
    assert summarise([None, float("nan")]) is None
    assert "±" not in summarise([3.0]).fmt()


def test_slope_of_a_line_and_of_flat_data():
    assert slope([0, 1, 2, 3], [5, 7, 9, 11]) == pytest.approx(2)
    assert slope([0, 1, 2], [4, 4, 4]) == 0
    assert slope([1], [2]) == 0


def test_rates_from_token_times():
    r = rates_from_token_times(0.0, [0.5, 0.6, 0.7, 0.8], prompt_tokens=100)
    assert r["ttft"] == 0.5 and r["prefill_tps"] == 200
    assert r["decode_tps"] == pytest.approx(10)
    assert [round(g, 6) for g in r["token_latencies"]] == [0.1, 0.1, 0.1]
    empty = rates_from_token_times(0.0, [], 10)
    assert empty["ttft"] is None and empty["new_tokens"] == 0
    one = rates_from_token_times(0.0, [0.2], 10)
    assert one["decode_tps"] is None and not math.isnan(one["ttft"])
