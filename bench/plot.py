"""One PNG per scenario: throughput, ack latency and relay RSS over time.

Drawn from the ``series`` of a result JSON, so a plot can be redrawn later::

    python -m bench.plot bench/results/batch.json
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import msgspec

PHASE_COLOURS = ["#e8f0fe", "#fef7e0", "#e6f4ea", "#fce8e6", "#f3e8fd"]


def _segment(x: float, phases: Sequence[Sequence[Any]], half: float) -> tuple[int, bool]:
    """Which stretch of the run the window ``[x - half, x + half]`` mostly falls in.

    (i, True): phase i; (i, False): the time after i phases ended, before the next.
    """
    ended = 0
    for i, (start, end, *_) in enumerate(phases):
        if min(x + half, float(end)) - max(x - half, float(start)) >= half:
            return i, True
        if float(end) <= x:
            ended = i + 1
    return ended, False


def broken(xs: Sequence[float], ys: Sequence[float | None],
           phases: Sequence[Sequence[Any]], step: float = 1.0
           ) -> tuple[list[float], list[float]]:
    """``xs``, ``ys`` with a NaN point wherever two neighbours lie in different stretches.

    A stretch is one phase, or the time between two phases (a drain, a wait);
    each point stands for a window of ``step`` seconds centred on it. Matplotlib
    draws no line through NaN, so a curve never joins the end of one phase to
    the start of an unrelated one with a straight line.
    """
    out_x: list[float] = []
    out_y: list[float] = []
    last: tuple[int, bool] | None = None
    for x, y in zip(xs, ys, strict=True):
        seg = _segment(x, phases, step / 2)
        if last is not None and seg != last:
            out_x.append(x)
            out_y.append(math.nan)
        out_x.append(x)
        out_y.append(math.nan if y is None else float(y))
        last = seg
    return out_x, out_y


def _phases(ax: Any, series: dict[str, Any], label: bool) -> None:
    for i, (start, end, name) in enumerate(series.get("phases", [])):
        ax.axvspan(start, end, color=PHASE_COLOURS[i % len(PHASE_COLOURS)], zorder=0)
        if label:
            ax.text((start + end) / 2, 1.0, name, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="#555")
    for t, name in series.get("marks", []):
        ax.axvline(t, color="#c5221f", linestyle="--", linewidth=1)
        if label:
            ax.text(t, 0.5, " " + name, transform=ax.get_xaxis_transform(), fontsize=8,
                    color="#c5221f", va="center",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"})


def plot(result: dict[str, Any], out: Path) -> None:
    series = result.get("series") or {}
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(11, 9), sharex=True,
                                              gridspec_kw={"height_ratios": [3, 2, 1.5]})
    title = f"{result['scenario']} ({result['mode']}) - {result['timestamp']}"
    fig.suptitle(title, fontsize=11)
    if not series:
        top.text(0.5, 0.5, result.get("error") or "no data", ha="center", va="center",
                 transform=top.transAxes, wrap=True)
        fig.savefig(out, dpi=90)
        plt.close(fig)
        return

    phases = series.get("phases", [])
    step = float(series.get("step_s", 1.0))
    acked, delivered = series["acked_rate"], series["delivered_rate"]
    top.plot(*broken(acked["t"], acked["per_s"], phases, step),
             label="acked msg/s (load generator)", color="#1a73e8", marker=".")
    top.plot(*broken(delivered["t"], delivered["per_s"], phases, step),
             label="delivered msg/s (simulator)", color="#188038", marker=".")
    refused = series.get("refused_per_s", {})
    if refused.get("t"):
        twin = top.twinx()
        twin.bar(refused["t"], refused["count"], width=0.8 * step,
                 color="#d93025", alpha=0.35, label="503/429 answers per s")
        twin.set_ylabel("503/429 per s", color="#d93025")
        twin.legend(loc="upper right", fontsize=8)
    top.set_ylabel("messages / s")
    top.legend(loc="upper left", fontsize=8)
    _phases(top, series, label=True)

    latency = series["latency_ms"]
    middle.plot(*broken(latency["t"], latency["p50"], phases, step), label="ack p50",
                color="#1a73e8", marker=".")
    middle.plot(*broken(latency["t"], latency["p99"], phases, step), label="ack p99",
                color="#e37400", marker=".")
    middle.set_yscale("log")
    middle.set_ylabel("ack latency (ms)")
    middle.legend(loc="upper left", fontsize=8)
    _phases(middle, series, label=False)

    # RSS is sampled every 100 ms without a gap: one unbroken curve is the truth there.
    rss = series["rss_mb"]
    redis = series.get("redis_rss_mb") or {}
    several = series.get("relays", 1) > 1
    bottom.plot(rss["t"], rss["mb"], color="#5f6368",
                label="relays' RSS, summed" if several else "relay RSS")
    if redis.get("t"):
        bottom.plot(redis["t"], redis["mb"], color="#c5221f", label="redis-server RSS")
        bottom.legend(loc="upper left", fontsize=8)
    bottom.set_ylabel("RSS (MB)" if redis.get("t") else "relay RSS (MB)")
    bottom.set_xlabel("seconds since the first load started")
    _phases(bottom, series, label=False)

    for ax in (top, middle, bottom):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    for name in argv:
        path = Path(name)
        plot(msgspec.json.decode(path.read_bytes()), path.with_suffix(".png"))
        print(path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
