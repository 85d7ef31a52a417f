"""benchmarks/serving.py's comparison at equal p99 latency: the engine's throughput at each static
point's p99, read along the engine's own rates."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serving  # noqa: E402


def test_throughput_at_reads_along_the_rates_until_the_latency_is_passed():
    points = [(0.1, 1000.0), (0.2, 2000.0), (1.0, 3000.0), (4.0, 3500.0)]  # rising rates
    # between the second and third point: linear in latency
    assert serving.throughput_at(points, 0.6) == (pytest.approx(2500.0), False)
    assert serving.throughput_at(points, 1.0) == (3000.0, False)
    # past every point: the highest measured, flagged as a lower bound
    assert serving.throughput_at(points, 9.0) == (3500.0, True)
    # below the lowest rate's latency: nothing the engine measured sustains it
    assert serving.throughput_at(points, 0.05) == (None, False)
    # the most within the latency, not the last: a rate that served less does not lower it
    assert serving.throughput_at([(0.1, 1000.0), (0.5, 3000.0), (0.9, 2500.0)], 2.0) == \
        (3000.0, True)
    assert serving.throughput_at([(0.1, 1000.0), (0.5, 3000.0), (0.9, 2500.0), (3.0, 100.0)],
                                 1.0)[0] == 3000.0
    # a later rate back under the latency does not count once one rate has passed it
    assert serving.throughput_at([(0.1, 1.0), (2.0, 2.0), (0.5, 3.0)], 1.0)[0] == \
        pytest.approx(1.0 + 0.9 / 1.9)


def _row(mode, rate, tps, ttft, latency):
    return {"mode": mode, "rate": rate, "tokens_per_s": tps, "ttft_p99_s": ttft,
            "latency_p99_s": latency, "steps_per_launch": 4 if mode == "continuous" else None,
            "max_prefill_tokens": 2048 if mode == "continuous" else None,
            "prefill_chunk": None}


def test_at_equal_latency_compares_each_static_point_per_metric():
    rows = [_row("continuous", 4, 1200.0, 0.05, 2.0), _row("continuous", 16, 4000.0, 1.0, 3.0),
            _row("static", 4, 1100.0, 2.5, 4.0), _row("static", 16, 2900.0, 0.5, 2.5)]
    out = {(r["metric"], r["rate"]): r for r in serving.at_equal_latency(rows)}
    assert len(out) == 4
    low = out["ttft_p99_s", 4]  # static's p99 TTFT 2.5 s: past every engine point
    assert (low["continuous_tokens_per_s"], low["at_least"]) == (4000.0, True)
    assert low["ratio"] == pytest.approx(4000 / 1100)
    mid = out["ttft_p99_s", 16]  # 0.5 s: between the engine's 4/s and 16/s
    assert mid["continuous_tokens_per_s"] == pytest.approx(1200 + 2800 * 0.45 / 0.95)
    assert not mid["at_least"]
    lat = out["latency_p99_s", 16]  # 2.5 s: halfway along the engine's latencies
    assert lat["continuous_tokens_per_s"] == pytest.approx(2600.0)
    assert lat["ratio"] == pytest.approx(2600 / 2900)


def test_percentiles_are_by_nearest_rank():
    values = list(range(1, 101))[::-1]  # 1..100, in any order
    assert serving.pct(values, 0.99) == 99 and serving.pct(values, 0.5) == 50
    assert serving.pct([3.0, 1.0], 0.5) == 1.0 and serving.pct([7.0], 0.99) == 7.0
    assert serving.pct([], 0.5) is None
