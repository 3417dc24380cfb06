"""Joining with one copy gives exactly what concatenating around a join gives."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from router.concat import join_wrapped

chunks = st.binary(max_size=40)


@given(head=chunks, parts=st.lists(chunks, max_size=6), tail=chunks, sep=chunks)
def test_the_same_bytes_as_concatenating(head: bytes, parts: list[bytes], tail: bytes,
                                         sep: bytes) -> None:
    assert join_wrapped(head, parts, tail, sep) == head + sep.join(parts) + tail


def test_views_into_a_body_join_like_their_bytes() -> None:
    body = b'{"batch":[{"a":1},{"b":[2]},{"c":"3"}]}'
    views = msgspec.json.decode(body, type=dict[str, list[msgspec.Raw]])["batch"]
    assert join_wrapped(b'{"items":[', views, b"]}") == b'{"items":[{"a":1},{"b":[2]},{"c":"3"}]}'
    assert join_wrapped(b"[", views[:1], b"]") == b'[{"a":1}]'
