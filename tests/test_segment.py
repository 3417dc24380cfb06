"""Segment message parsing and validation, without HTTP."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from router import segment
from router.customer import CustomerState, TurnContext, turn
from router.errors import Rejected
from router.journal import merge_shared, shared_part
from router.mapping import EventPolicy, ExtrasCache, LimitExceeded, Schema
from router.segment import Envelope, coerce_id, event_time, parse_time, validate

NOW = 1_700_000_000.0


def rejected(code: str, message: Any, type_: str | None = None, **kwargs: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        validate(message, type_=type_, received_at=NOW, **kwargs)
    assert info.value.code == code
    assert info.value.status == 400
    assert info.value.message
    return info.value


def envelope(**fields: Any) -> Envelope:
    return msgspec.json.decode(msgspec.json.encode({"batch": [], **fields}), type=Envelope)


class TestParseTime:
    """ISO-8601 strings become POSIX seconds; naive times are UTC; anything else is refused."""

    @pytest.mark.parametrize(("text", "expected"), [
        ("2024-03-01T12:00:00Z", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01T12:00:00+00:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01T14:00:00+02:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01T12:00:00.123456Z", datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-03-01T12:00:00.123Z", datetime(2024, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)),
        ("2024-03-01T12:00:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01 12:00:00", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        (" 2024-03-01T12:00:00Z ", datetime(2024, 3, 1, 12, tzinfo=UTC)),
        ("2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),
    ])
    def test_iso_strings(self, text: str, expected: datetime) -> None:
        assert parse_time(text, "timestamp") == expected.timestamp()

    def test_posix_numbers_pass_through(self) -> None:
        assert parse_time(NOW, "timestamp") == NOW
        assert parse_time(1_700_000_000, "timestamp") == NOW
        assert isinstance(parse_time(1_700_000_000, "timestamp"), float)

    @pytest.mark.parametrize("value", [
        "yesterday", "", "2024-13-01T00:00:00Z", "2024-02-30", "12:00", True, None, [],
        {"t": 1}, 1e300, -1e300,
    ])
    def test_refused(self, value: Any) -> None:
        with pytest.raises(Rejected) as info:
            parse_time(value, "sentAt")
        assert info.value.code == "invalid_timestamp"
        assert "sentAt" in info.value.message

    @given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9000, 1, 1),
                        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7, minutes=-30)),
                                                   timezone(timedelta(hours=9))])))
    def test_round_trip(self, moment: datetime) -> None:
        assert parse_time(moment.isoformat(), "timestamp") == pytest.approx(
            moment.timestamp(), abs=1e-6)


class TestEventTime:
    """A timestamp wins, else receivedAt - (sentAt - originalTimestamp), else receivedAt."""

    def test_timestamp_wins(self) -> None:
        message = {"timestamp": "2024-03-01T12:00:00Z", "originalTimestamp": "2020-01-01T00:00:00Z",
                   "sentAt": "2020-01-01T00:01:00Z"}
        assert event_time(message, NOW, None) == datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()

    def test_skew_correction(self) -> None:
        message = {"originalTimestamp": "2030-01-01T00:00:00Z"}
        sent = "2030-01-01T00:00:30Z"  # the client clock is years off; only the 30 s matter
        assert event_time(message, NOW, sent) == NOW - 30

    def test_message_sent_at_wins_over_envelope(self) -> None:
        message = {"originalTimestamp": "2030-01-01T00:00:00Z", "sentAt": "2030-01-01T00:00:10Z"}
        assert event_time(message, NOW, "2030-01-01T05:00:00Z") == NOW - 10

    @pytest.mark.parametrize("message", [
        {}, {"originalTimestamp": "2030-01-01T00:00:00Z"}, {"sentAt": "2030-01-01T00:00:00Z"},
    ])
    def test_falls_back_to_received_at(self, message: dict[str, Any]) -> None:
        assert event_time(message, NOW, None) == NOW

    def test_unparseable_parts_are_refused_even_beside_a_timestamp(self) -> None:
        with pytest.raises(Rejected, match="sentAt"):
            event_time({"timestamp": "2024-01-01T00:00:00Z"}, NOW, "not a time")
        with pytest.raises(Rejected, match="originalTimestamp"):
            event_time({"originalTimestamp": "soon"}, NOW, None)


class TestCoerceId:
    """Ids become non-empty strings: numbers are converted, other types and blanks refused."""

    @pytest.mark.parametrize(("value", "expected"), [
        ("u1", "u1"), (42, "42"), (-7, "-7"), (0, "0"), (12.5, "12.5"), (2**63 - 1, str(2**63 - 1)),
    ])
    def test_accepted(self, value: Any, expected: str) -> None:
        message = {"userId": value}
        assert coerce_id(message, "userId", required=True) == expected
        assert message["userId"] == expected

    @pytest.mark.parametrize("value", ["", "   ", "\t\n"])
    def test_blank_is_invalid(self, value: str) -> None:
        with pytest.raises(Rejected) as info:
            coerce_id({"userId": value}, "userId", required=False)
        assert info.value.code == "invalid_id"

    @pytest.mark.parametrize("value", [True, False, [], ["u"], {"id": 1}])
    def test_wrong_types_are_invalid(self, value: Any) -> None:
        with pytest.raises(Rejected) as info:
            coerce_id({"userId": value}, "userId", required=False)
        assert info.value.code == "invalid_id"

    def test_missing(self) -> None:
        assert coerce_id({}, "userId", required=False) is None
        assert coerce_id({"userId": None}, "userId", required=False) is None
        with pytest.raises(Rejected) as info:
            coerce_id({"userId": None}, "userId", required=True)
        assert info.value.code == "missing_id"
        assert "userId" in info.value.message

    @given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
    def test_any_json_integer(self, value: int) -> None:
        assert coerce_id({"anonymousId": value}, "anonymousId", required=True) == str(value)


class TestValidate:
    """validate() enforces the per-message rules, normalises in place and adds the event time."""

    @pytest.mark.parametrize(("type_", "message"), [
        ("identify", {"userId": "u1"}),
        ("identify", {"anonymousId": "a1", "traits": {"x": 1}}),
        ("track", {"userId": "u1", "event": "Signed Up", "properties": {}}),
        ("page", {"anonymousId": "a1"}),
        ("page", {"anonymousId": "a1", "name": "Home", "category": "Docs"}),
        ("screen", {"userId": "u1", "name": "Settings"}),
        ("group", {"userId": "u1", "groupId": "g1"}),
        ("alias", {"userId": "u1", "previousId": "a1"}),
    ])
    def test_valid_messages(self, type_: str, message: dict[str, Any]) -> None:
        out = validate(dict(message), type_=type_, received_at=NOW)
        assert out["type"] == type_
        assert out[segment.TIME_KEY] == NOW
        assert {k: v for k, v in out.items()
                if k not in ("type", "messageId", segment.TIME_KEY)} == message

    def test_type_from_the_message_or_the_path(self) -> None:
        assert validate({"type": "page", "userId": "u"}, type_=None, received_at=NOW)["type"] \
            == "page"
        out = validate({"type": "page", "userId": "u"}, type_="identify", received_at=NOW)
        assert out["type"] == "identify"

    def test_normalises_in_place(self) -> None:
        message: dict[str, Any] = {"type": "group", "userId": 5, "anonymousId": 6,
                                   "groupId": 7, "messageId": 8, "extra": {"kept": True}}
        out = validate(message, type_=None, received_at=NOW)
        assert out is message
        assert (out["userId"], out["anonymousId"], out["groupId"], out["messageId"]) == \
            ("5", "6", "7", "8")
        assert out["extra"] == {"kept": True}

    @pytest.mark.parametrize("message_id", [None, ""])
    def test_missing_message_id_is_filled(self, message_id: Any) -> None:
        message = {"type": "track", "userId": "u", "event": "e", "messageId": message_id}
        filled = validate(message, type_=None, received_at=NOW)["messageId"]
        assert uuid.UUID(filled)
        other = validate({"type": "track", "userId": "u", "event": "e"},
                         type_=None, received_at=NOW)["messageId"]
        assert other != filled

    def test_message_id_length(self) -> None:
        ok = {"type": "track", "userId": "u", "event": "e", "messageId": "m" * 100}
        assert validate(ok, type_=None, received_at=NOW)["messageId"] == "m" * 100
        error = rejected("invalid_message_id", {**ok, "messageId": "m" * 101})
        assert "101" in error.message
        rejected("invalid_message_id", {**ok, "messageId": ["m"]})
        rejected("invalid_message_id", {**ok, "messageId": True})

    @pytest.mark.parametrize(("message", "code"), [
        ([], "invalid_message"),
        ("track", "invalid_message"),
        (None, "invalid_message"),
        ({"userId": "u"}, "invalid_type"),
        ({"type": "purchase", "userId": "u"}, "invalid_type"),
        ({"type": "Track", "userId": "u", "event": "e"}, "invalid_type"),
        ({"type": "track", "event": "e"}, "missing_id"),
        ({"type": "track", "userId": None, "anonymousId": None, "event": "e"}, "missing_id"),
        ({"type": "identify", "userId": ""}, "invalid_id"),
        ({"type": "identify", "userId": "u", "anonymousId": ""}, "invalid_id"),
        ({"type": "identify", "userId": {"id": 1}}, "invalid_id"),
        ({"type": "alias", "userId": "u"}, "missing_id"),
        ({"type": "alias", "previousId": "p"}, "missing_id"),
        ({"type": "alias", "anonymousId": "a", "previousId": "p"}, "missing_id"),
        ({"type": "alias", "userId": "u", "previousId": ""}, "invalid_id"),
        ({"type": "track", "userId": "u"}, "missing_event"),
        ({"type": "track", "userId": "u", "event": " "}, "missing_event"),
        ({"type": "track", "userId": "u", "event": 5}, "missing_event"),
        ({"type": "group", "userId": "u"}, "missing_id"),
        ({"type": "group", "userId": "u", "groupId": ""}, "invalid_id"),
        ({"type": "group", "userId": "u", "groupId": False}, "invalid_id"),
        ({"type": "page", "userId": "u", "name": ["Home"]}, "invalid_field"),
        ({"type": "screen", "userId": "u", "category": 3}, "invalid_field"),
        ({"type": "track", "userId": "u", "event": "e", "properties": [1]}, "invalid_field"),
        ({"type": "identify", "userId": "u", "traits": "vip"}, "invalid_field"),
        ({"type": "identify", "userId": "u", "context": 1}, "invalid_field"),
        ({"type": "identify", "userId": "u", "integrations": []}, "invalid_field"),
        ({"type": "track", "userId": "u", "event": "e", "timestamp": "later"},
         "invalid_timestamp"),
        ({"type": "track", "userId": "u", "event": "e", "originalTimestamp": {}},
         "invalid_timestamp"),
    ])
    def test_refused_with_reason(self, message: Any, code: str) -> None:
        rejected(code, message)

    def test_envelope_sent_at_is_validated(self) -> None:
        rejected("invalid_timestamp", {"type": "identify", "userId": "u"}, sent_at="whenever")

    def test_time_fix_up_is_applied(self) -> None:
        out = validate({"type": "identify", "userId": "u",
                        "originalTimestamp": "2024-01-01T00:00:00Z"},
                       type_=None, received_at=NOW, sent_at="2024-01-01T00:01:00Z")
        assert out[segment.TIME_KEY] == NOW - 60


def merge_envelope(item: Any, env: Envelope) -> Any:
    """As intake does: the envelope's shared part merged into a (validated) item."""
    shared = shared_part(env.context, env.integrations)
    return merge_shared(item, shared) if shared and isinstance(item, dict) else item


class TestMergeEnvelope:
    """The batch's context and integrations reach every item, the item's own keys winning."""

    def test_item_keys_win(self) -> None:
        env = envelope(context={"ip": "1.1.1.1", "locale": "en"},
                       integrations={"All": False, "Infinario": True})
        item = merge_envelope({"type": "track", "context": {"locale": "de"},
                               "integrations": {"All": True}}, env)
        assert item["context"] == {"ip": "1.1.1.1", "locale": "de"}
        assert item["integrations"] == {"All": True, "Infinario": True}

    def test_missing_item_fields_get_a_copy(self) -> None:
        env = envelope(context={"ip": "1.1.1.1"})
        first = merge_envelope({"type": "track"}, env)
        second = merge_envelope({"type": "track"}, env)
        assert first["context"] == second["context"] == {"ip": "1.1.1.1"}
        first["context"]["ip"] = "changed"
        assert second["context"] == {"ip": "1.1.1.1"}
        assert env.context == {"ip": "1.1.1.1"}
        assert "integrations" not in first

    def test_null_item_context_takes_the_envelope(self) -> None:
        item = merge_envelope({"context": None}, envelope(context={"ip": "1.1.1.1"}))
        assert item["context"] == {"ip": "1.1.1.1"}

    def test_no_envelope_fields_leaves_the_item_alone(self) -> None:
        assert merge_envelope({"type": "track"}, envelope()) == {"type": "track"}
        assert merge_envelope({"type": "track"}, envelope(context={})) == {"type": "track"}

    def test_invalid_items_pass_through_for_validation(self) -> None:
        env = envelope(context={"ip": "1.1.1.1"})
        assert merge_envelope(["x"], env) == ["x"]
        item = merge_envelope({"type": "track", "context": ["x"]}, env)
        assert item["context"] == ["x"]
        rejected("invalid_field", {**item, "userId": "u", "event": "e"})


class TestDecoding:
    """Envelopes and items decode with reason codes for each kind of malformed input."""

    def test_envelope(self) -> None:
        env = segment.decode_envelope(
            b'{"batch": [{"type": "track"}, 1], "sentAt": "2024-01-01T00:00:00Z",'
            b' "writeKey": "wk", "context": {"ip": "x"}, "extra": true}')
        assert [bytes(item) for item in env.batch] == [b'{"type": "track"}', b"1"]
        assert env.writeKey == "wk"
        assert env.sentAt == "2024-01-01T00:00:00Z"
        assert env.context == {"ip": "x"}

    @pytest.mark.parametrize(("body", "code"), [
        (b"", "invalid_json"),
        (b"{", "invalid_json"),
        (b'{"batch": []} trailing', "invalid_json"),
        (b"[]", "invalid_body"),
        (b"null", "invalid_body"),
        (b"{}", "missing_batch"),
        (b'{"batch": null}', "invalid_batch"),
        (b'{"batch": "x"}', "invalid_batch"),
        (b'{"batch": [], "integrations": 5}', "invalid_batch"),
    ])
    def test_envelope_refused(self, body: bytes, code: str) -> None:
        with pytest.raises(Rejected) as info:
            segment.decode_envelope(body)
        assert (info.value.code, info.value.status) == (code, 400)

    def test_item_size_limit_is_per_item(self) -> None:
        pad = "x" * (segment.MAX_MESSAGE_BYTES - 20)
        fits = msgspec.json.encode({"p": pad})
        assert len(fits) <= segment.MAX_MESSAGE_BYTES
        assert segment.decode_item(msgspec.Raw(fits)) == {"p": pad}
        too_big = msgspec.json.encode({"p": pad + "x" * 100})
        with pytest.raises(Rejected) as info:
            segment.decode_item(msgspec.Raw(too_big))
        assert info.value.code == "message_too_large"

    @staticmethod
    def nested(depth: int) -> bytes:
        """A JSON object whose objects and arrays nest ``depth`` levels."""
        inner = depth - 1
        return b'{"p": ' + b"[" * inner + b"1" + b"]" * inner + b"}"

    def test_nesting_up_to_the_limit_is_fine(self) -> None:
        body = self.nested(segment.MAX_DEPTH)
        assert segment.decode_json(body)["p"]
        assert segment.decode_item(msgspec.Raw(body))["p"]

    @pytest.mark.parametrize("depth", [segment.MAX_DEPTH + 1, 5000])
    def test_deeper_nesting_is_refused(self, depth: int) -> None:
        body = self.nested(depth)
        for decode in (segment.decode_json, lambda b: segment.decode_item(msgspec.Raw(b))):
            with pytest.raises(Rejected) as info:
                decode(body)
            assert (info.value.code, info.value.status) == ("too_deep", 400)

    def test_wide_payloads_are_not_deep(self) -> None:
        body = msgspec.json.encode({"items": [{"a": [1]} for _ in range(500)]})
        assert len(segment.decode_json(body)["items"]) == 500

    @pytest.mark.parametrize("body", [
        b'{"batch": [], "context": {"a": ' + b"[" * 70 + b"]" * 70 + b"}}",
        b'{"batch": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
    ])
    def test_deep_envelopes_are_refused(self, body: bytes) -> None:
        # Whether the JSON decoder can scan past 5,000 levels depends on the
        # interpreter: the envelope is refused, or else its deep item is.
        with pytest.raises(Rejected) as info:
            envelope = segment.decode_envelope(body)
            for raw in envelope.batch:
                segment.decode_item(raw)
        assert info.value.code == "too_deep"

    def test_decode_json(self) -> None:
        assert segment.decode_json(b'{"a": 1}') == {"a": 1}
        with pytest.raises(Rejected) as info:
            segment.decode_json(b"{'a': 1}")
        assert info.value.code == "invalid_json"


class TestJournalBytes:
    """Where validation only adds ``_time``, the client's bytes plus that key are the message."""

    ids = st.one_of(st.none(), st.text(min_size=1).filter(str.strip), st.integers(),
                    st.floats(allow_nan=False, allow_infinity=False))

    @given(user=ids, anon=ids, message_id=st.one_of(st.none(), st.just(""), st.text(max_size=20),
                                                    st.integers()),
           extra=st.dictionaries(st.text(max_size=8), st.integers() | st.text(), max_size=4))
    def test_bytes_decode_to_the_validated_message(
        self, user: Any, anon: Any, message_id: Any, extra: dict[str, Any]
    ) -> None:
        item = {**extra, "type": "track", "event": "e", "userId": user, "anonymousId": anon,
                "messageId": message_id, "timestamp": "2024-03-01T12:00:00Z"}
        raw = msgspec.json.encode(item)
        try:
            decoded = msgspec.json.decode(raw)
            as_sent = segment.validation_adds_only_time(decoded)
            message = validate(decoded, type_=None, received_at=1.0)
        except Rejected:
            return
        if as_sent:
            assert msgspec.json.decode(segment.with_time(raw, message["_time"])) == message
        else:
            ids = [item.get(f) for f in ("userId", "anonymousId", "previousId", "groupId")]
            assert (type(item["messageId"]) is not str or not item["messageId"]
                    or any(v is not None and type(v) is not str for v in ids)
                    or "_time" in item)

    def test_typical_client_messages_qualify(self) -> None:
        raw = (b'{"type":"identify","messageId":"m-1","userId":"u1","traits":{"a":1},'
               b'"timestamp":"2024-03-01T12:00:00.5Z"}  ')
        item = msgspec.json.decode(raw)
        assert segment.validation_adds_only_time(item)
        message = validate(item, type_=None, received_at=0.0)
        assert msgspec.json.decode(segment.with_time(raw, message["_time"])) == message

    @pytest.mark.parametrize("item", [
        {"type": "track", "event": "e", "userId": 7, "messageId": "m"},
        {"type": "track", "event": "e", "userId": "u"},
        {"type": "track", "event": "e", "userId": "u", "messageId": 12},
        {"type": "group", "groupId": 3, "userId": "u", "messageId": "m"},
        {"type": "alias", "previousId": 1, "userId": "u", "messageId": "m"},
        {"type": "track", "event": "e", "userId": "u", "messageId": "m", "_time": 5},
    ], ids=["numeric id", "no messageId", "numeric messageId", "numeric groupId",
            "numeric previousId", "own _time"])
    def test_messages_validation_changes_are_encoded_anew(self, item: dict[str, Any]) -> None:
        assert not segment.validation_adds_only_time(item)


class TestContextKey:
    """The key of a message's context extras: the same for the same context bytes in
    any message, another for another context, none without a context."""

    def test_same_context_same_key(self) -> None:
        a = b'{"type":"track","event":"a","context":{"ip":"1.2.3.4","os":{"name":"iOS"}}}'
        b = b'{"context":{"ip":"1.2.3.4","os":{"name":"iOS"}},"type":"page","userId":"u"}'
        other = b'{"type":"track","context":{"ip":"1.2.3.5","os":{"name":"iOS"}}}'
        assert segment.context_key(a) == segment.context_key(b)
        assert isinstance(segment.context_key(a), int)
        assert segment.context_key(a) != segment.context_key(other)

    def test_no_context_no_key(self) -> None:
        for data in (b'{"type":"track"}', b'{"context":null}', b'{"context":{}}'):
            assert segment.context_key(data) is None


# --- the lean decode ---------------------------------------------------------------------------

_KEYS = st.text(st.sampled_from("ab.$_"), min_size=1, max_size=3)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text("xy", max_size=2))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=2), st.dictionaries(_KEYS, inner, max_size=3)), max_leaves=6)
_IDS = st.one_of(st.none(), st.sampled_from(["u1", "a1", "", " "]), st.integers(0, 3))
_TIMES = st.one_of(st.none(), st.sampled_from(["2024-03-01T10:00:00Z", "bad", 1709287200]))
_CONTEXTS = st.one_of(
    st.none(), _VALUES,
    st.fixed_dictionaries({}, optional={
        "ip": st.just("10.0.0.1"), "os": st.fixed_dictionaries({"name": st.just("iOS")}),
        "page": st.fixed_dictionaries({}, optional={"url": st.just("https://x.test/")}),
        "traits": st.dictionaries(_KEYS, _SCALARS, max_size=2), "a.b": _VALUES}))
# Every field the pipeline reads, each absent or of any JSON type, and one it does not.
_WILD = {
    "type": st.sampled_from(["track", "page", "screen", "identify", "group", "alias", "x", 1]),
    "messageId": st.one_of(st.sampled_from(["m1", ""]), st.integers(0, 3), st.none()),
    "userId": _IDS, "anonymousId": _IDS, "previousId": _IDS, "groupId": _IDS,
    "event": st.one_of(st.sampled_from(["Viewed", " "]), _SCALARS),
    "name": st.one_of(st.just("Home"), _SCALARS), "category": _SCALARS,
    "timestamp": _TIMES, "originalTimestamp": _TIMES, "sentAt": _TIMES,
    "properties": _VALUES, "traits": _VALUES, "context": _CONTEXTS, "integrations": _VALUES,
    "channel": st.just("server"), "_time": st.just(1.0),
}
_VALID = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["track", "page", "screen"]),
                           "event": st.just("Viewed"), "userId": st.just("u1")}),
    st.fixed_dictionaries({"type": st.sampled_from(["identify", "group"]),
                           "anonymousId": st.just("a1"), "groupId": st.just("g1")}),
    st.fixed_dictionaries({"type": st.just("alias"), "userId": st.just("u1"),
                           "previousId": st.just("a1")}),
)
# Mostly valid messages with a string messageId (the ones the lean decode takes),
# some fields replaced by anything at all.
_MESSAGES = st.builds(
    lambda valid, wild: {**valid, "messageId": "m1", **wild}, _VALID,
    st.sets(st.sampled_from(sorted(_WILD)), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({key: _WILD[key] for key in keys})))


def _validated(item: Any, *, lean: bool = False) -> dict[str, Any] | str:
    try:
        return validate(item, type_=None, received_at=1709287300.0,
                        sent_at="2024-03-01T10:00:30Z", lean=lean)
    except Rejected as exc:
        return exc.code


def _commands(message: dict[str, Any], context_key: int | None) -> list[Any] | str:
    context = TurnContext("p", Schema(), EventPolicy(), 1200.0, 1709287300.0, ExtrasCache())
    context.context_key = context_key
    try:
        return turn(CustomerState(1, "p"), message, context)
    except LimitExceeded as exc:
        return exc.code


class TestDecodeLean:
    """The lean decode must decide every item as the full one does."""

    @given(_MESSAGES)
    @settings(max_examples=300)
    @example({"type": "track", "event": "e", "userId": "u", "messageId": "m",
              "originalTimestamp": "2024-03-01T10:00:00Z"})
    @example({"type": "page", "userId": "u", "messageId": "m", "context": {}})
    def test_decides_as_the_full_decode(self, fields: dict[str, Any]) -> None:
        data = msgspec.json.encode(fields)
        lean = segment.decode_lean(data)
        full = _validated(segment.decode_item(data))
        if lean is None:
            return
        lean = _validated(lean, lean=True)
        if isinstance(full, str):
            assert lean == full
            return
        assert not isinstance(lean, str)
        # What the pipeline would keep of the message: the client's own fields.
        assert msgspec.json.decode(segment.message_json(lean)) == full
        assert lean[segment.TIME_KEY] == full[segment.TIME_KEY]
        raw = lean.get("context")
        key = segment.raw_context_key(raw) if raw is not None else None
        assert key == segment.context_key(data)
        assert _commands(lean, key) == _commands(full, key)
        assert _commands(lean, None) == _commands(full, None)

    @pytest.mark.parametrize("data", [
        b'{"type":"track","event":"e","userId":"u","messageId":"m","_time":1}',
        b'{"type":"track","event":"e","userId":7,"messageId":"m"}',
        b'{"type":"track","event":"e","userId":"u","messageId":7}',
        b'{"type":"track","event":"e","userId":"u"}',
        b'{"type":"track","event":"e","userId":"u","messageId":""}',
        b'{"type":"track","event":"e","userId":"u","messageId":null}',
        b'{"type":"group","groupId":5,"userId":"u","messageId":"m"}',
        b'{"type":"track","event":"e","anonymousId":1.5,"messageId":"m"}',
        b'{"type":"track","event":"e","userId":"u","messageId":"m","context":[1]}',
        b'{"type":"track","event":"e","userId":"u","messageId":"m","context":"x"}',
        b'{"type":"Track","event":"e","userId":"u","messageId":"m"}',
        b'{"type":["track"],"event":"e","userId":"u","messageId":"m"}',
        b'{"type":"track","event":"e","userId":"u","messageId":"m","properties":'
        + b'{"a":' * 70 + b"1" + b"}" * 71,
        b'[{"type":"track"}]',
        b'{"type":"track",',
    ])
    def test_leaves_to_the_full_decode(self, data: bytes) -> None:
        assert segment.decode_lean(data) is None

    def test_keeps_the_context_as_json_until_read(self) -> None:
        data = (b'{"type":"page","userId":"u","messageId":"m","channel":"web",'
                b'"context":{"page":{"url":"https://x.test/"}}}')
        message = segment.decode_lean(data)
        assert message is not None
        assert isinstance(message["context"], msgspec.Raw)
        assert bytes(message["context"]) == b'{"page":{"url":"https://x.test/"}}'
        assert "channel" not in message  # skipped here, kept in the journal's bytes
        validate(message, type_=None, received_at=1.0, lean=True)
        assert segment.message_json(message) == data[:-1] + b',"_time":1.0}'
        assert segment.context_of(message) == {"page": {"url": "https://x.test/"}}
        assert message["context"] == {"page": {"url": "https://x.test/"}}

    def test_absent_sent_at_defers_to_the_batch_and_null_does_not(self) -> None:
        base = b'"type":"track","event":"e","userId":"u","messageId":"m","originalTimestamp":'
        stamp = b'"2024-03-01T10:00:00Z"'
        absent = segment.decode_lean(b"{" + base + stamp + b"}")
        null = segment.decode_lean(b"{" + base + stamp + b',"sentAt":null}')
        assert absent is not None and null is not None
        sent_at = "2024-03-01T10:00:30Z"
        assert event_time(absent, 100.0, sent_at) == 70.0
        assert event_time(null, 100.0, sent_at) == 100.0

    def test_a_clients_bytes_named_like_the_raw_key_are_not_taken_for_them(self) -> None:
        message = {"type": "track", segment.RAW_KEY: "not bytes", segment.TIME_KEY: 1.0}
        assert msgspec.json.decode(segment.message_json(message)) == message
