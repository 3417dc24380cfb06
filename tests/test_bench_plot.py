"""Benchmark plots: curves break between phases instead of joining them with a line."""

from __future__ import annotations

import math
from pathlib import Path

from bench.plot import broken, plot

PHASES = [(0.0, 2.0, "max-rate"), (4.0, 6.0, "50% open loop")]


def _runs(ys: list[float]) -> list[list[float]]:
    """The pieces a line is drawn in: values between NaNs."""
    runs: list[list[float]] = [[]]
    for y in ys:
        if math.isnan(y):
            runs.append([])
        else:
            runs[-1].append(y)
    return [r for r in runs if r]


def test_a_curve_breaks_where_a_phase_ends_and_where_the_next_begins() -> None:
    xs = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    xs_out, ys_out = broken(xs, [1.0, 2.0, 3.0, 4.0, 5.0, None], PHASES)
    assert _runs(ys_out) == [[1.0, 2.0], [3.0, 4.0], [5.0]]
    assert len(xs_out) == len(ys_out)
    assert [x for x, y in zip(xs_out, ys_out, strict=True) if not math.isnan(y)] == xs[:5]


def test_a_window_belongs_to_the_phase_it_mostly_covers() -> None:
    # [3.8, 4.05] lies mostly before the second phase; [3.9, 4.15] mostly inside it.
    _, ys = broken([3.925, 4.025, 4.125], [1.0, 2.0, 3.0], PHASES, step=0.25)
    assert _runs(ys) == [[1.0], [2.0, 3.0]]


def test_a_quick_result_plots(tmp_path: Path) -> None:
    series = {"phases": PHASES, "marks": [(1.0, "down")], "step_s": 0.5,
              "acked_rate": {"t": [0.25, 0.75, 4.25], "per_s": [10.0, 12.0, 5.0]},
              "delivered_rate": {"t": [0.25, 0.75, 4.25], "per_s": [9.0, 12.0, 5.0]},
              "latency_ms": {"t": [0.25, 4.25], "p50": [1.0, 2.0], "p99": [3.0, 4.0]},
              "refused_per_s": {"t": [0.75], "count": [2.0]},
              "rss_mb": {"t": [0.0, 1.0], "mb": [40.0, 41.0]}}
    out = tmp_path / "x.png"
    plot({"scenario": "batch", "mode": "quick", "timestamp": "now", "series": series}, out)
    assert out.read_bytes().startswith(b"\x89PNG")
