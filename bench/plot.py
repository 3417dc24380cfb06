"""One PNG per scenario: throughput, ack latency and relay RSS over time.

Drawn from the ``series`` of a result JSON, so a plot can be redrawn later::

    python -m bench.plot bench/results/batch.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import msgspec

PHASE_COLOURS = ["#e8f0fe", "#fef7e0", "#e6f4ea", "#fce8e6", "#f3e8fd"]


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

    acked, delivered = series["acked_rate"], series["delivered_rate"]
    top.plot(acked["t"], acked["per_s"], label="acked msg/s (load generator)", color="#1a73e8")
    top.plot(delivered["t"], delivered["per_s"], label="delivered msg/s (simulator)",
             color="#188038")
    refused = series.get("refused_per_s", {})
    if refused.get("t"):
        twin = top.twinx()
        twin.bar(refused["t"], refused["count"], width=0.8, color="#d93025", alpha=0.35,
                 label="503/429 answers per s")
        twin.set_ylabel("503/429 per s", color="#d93025")
        twin.legend(loc="upper right", fontsize=8)
    top.set_ylabel("messages / s")
    top.legend(loc="upper left", fontsize=8)
    _phases(top, series, label=True)

    latency = series["latency_ms"]
    middle.plot(latency["t"], latency["p50"], label="ack p50", color="#1a73e8", marker=".")
    middle.plot(latency["t"], latency["p99"], label="ack p99", color="#e37400", marker=".")
    middle.set_yscale("log")
    middle.set_ylabel("ack latency (ms)")
    middle.legend(loc="upper left", fontsize=8)
    _phases(middle, series, label=False)

    rss = series["rss_mb"]
    bottom.plot(rss["t"], rss["mb"], color="#5f6368")
    bottom.set_ylabel("relay RSS (MB)")
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
