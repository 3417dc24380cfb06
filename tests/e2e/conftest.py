from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .harness import Stack, open_stack


@pytest.fixture(params=["legacy", "v2"])
def api(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs against both Infinario dialects."""
    return str(request.param)


@pytest.fixture
def stack_options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def stack(tmp_path: Path, api: str, stack_options: dict[str, Any]) -> AsyncIterator[Stack]:
    options = dict(stack_options)
    if api == "v2":
        options.setdefault("infinario_auth", "token:e2e-secret")
    async with open_stack(tmp_path / "data", api=api, **options) as stack:
        yield stack
