"""A short fixed-seed fuzz of the intake; ``make fuzz`` runs the long one."""

from __future__ import annotations

from pathlib import Path

from .fuzz import run

REQUESTS = 3000
RSS_GROWTH = 200 * 1024**2


class TestFuzz:
    """Hostile requests never get a 5xx, canaries beside them arrive exactly once."""

    async def test_fixed_seed_fuzz(self, tmp_path: Path) -> None:
        report = await run(REQUESTS, seed=7, data_dir=tmp_path / "data")
        assert report.requests == REQUESTS
        assert report.problems() == [], report.summary()
        assert not any(status.startswith("5") for status in report.statuses)
        assert report.canaries_sent == REQUESTS // 25
        assert report.rss_peak - report.rss_start < RSS_GROWTH, report.summary()
        # The mutations reached the relay's checks, not only its framing.
        assert report.statuses["200"] > report.canaries_sent
        assert report.statuses["400"] > 0
