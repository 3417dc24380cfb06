"""The README's promises that can be run as they stand."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


class TestEmbeddingExample:
    """The embedding example runs verbatim and delivers its message to the simulator."""

    def test_runs_as_written(self, tmp_path: Path) -> None:
        [example] = [block for block in python_blocks() if "open_router" in block]
        result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "'type': 'Signed Up'" in result.stdout
        assert "'customer_ids': {'registered': 'ada'}" in result.stdout
