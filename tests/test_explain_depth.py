from __future__ import annotations

import sys

import msgspec
import pytest

from router.explain import PARSE_DEPTH, json_depth_exceeds


class TestJsonDepth:
    """Nesting depth is measured from the bytes, whatever the interpreter's recursion limit."""

    @pytest.mark.parametrize(("data", "depth"), [
        (b"1", 0), (b"[]", 1), (b'{"a": [1, {"b": []}]}', 4), (b'[[], [], [[]]]', 3),
        (b'{"s": "[[[[{{{{"}', 1), (b'["\\\\\\"[[["]', 1),
    ])
    def test_depth(self, data: bytes, depth: int) -> None:
        msgspec.json.decode(data)  # every case is valid JSON
        assert not json_depth_exceeds(data, depth)
        if depth:
            assert json_depth_exceeds(data, depth - 1)

    def test_bracket_count_alone_is_not_depth(self) -> None:
        wide = b"[" + b",".join([b"[]"] * 5000) + b"]"
        assert not json_depth_exceeds(wide)

    @pytest.mark.parametrize("limit", [200, 400, 10_000])
    def test_independent_of_the_recursion_limit(self, limit: int) -> None:
        before = sys.getrecursionlimit()
        sys.setrecursionlimit(limit)
        try:
            assert json_depth_exceeds(b"[" * 100_000 + b"]" * 100_000)
            assert not json_depth_exceeds(b"[" * PARSE_DEPTH + b"]" * PARSE_DEPTH)
        finally:
            sys.setrecursionlimit(before)
