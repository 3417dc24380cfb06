from __future__ import annotations

import pickle
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.mapping import (
    CONTEXT_EXCLUDED,
    REPORT_SAMPLES,
    EventPolicy,
    LimitExceeded,
    Limits,
    Schema,
    clean_properties,
    context_extras,
    event_properties,
    flatten,
    group_properties,
    sanitize,
)

# Keys drawn from a tiny alphabet so collisions between flattened, sanitized
# and clean keys are frequent rather than astronomically rare.
keys = st.text(alphabet="ab_.$", max_size=4)
clean_keys = st.text(alphabet="ab_x", max_size=4)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=10,
)
payloads = st.dictionaries(keys, json_values, max_size=8)

# The property tests below set ``deadline=None``: the suite shares a small,
# busy machine, and a slow first example would fail them for a reason that has
# nothing to do with what they prove.


def first_two_levels(raw: dict[str, Any]) -> list[Any]:
    values: list[Any] = []
    for value in raw.values():
        values.append(value)
        if isinstance(value, dict):
            values.extend(value.values())
    return values


class TestFlatten:
    """The first level of nested objects is unpacked into parent_child keys and nothing deeper."""

    def test_seed_address_example(self) -> None:
        raw = {"address": {"country": "UK", "city": "London"}}
        assert flatten(raw) == {"address_country": "UK", "address_city": "London"}

    def test_deeper_levels_stay_as_values(self) -> None:
        inner = {"c": 1}
        out = flatten({"a": {"b": inner}})
        assert out == {"a_b": {"c": 1}}
        assert out["a_b"] is inner

    def test_lists_stay_as_values(self) -> None:
        items = [{"sku": "x"}, {"sku": "y"}]
        out = flatten({"products": items, "tags": ["a", "b"]})
        assert out == {"products": items, "tags": ["a", "b"]}
        assert out["products"] is items

    def test_empty_nested_object_disappears(self) -> None:
        assert flatten({"a": {}, "b": 1}) == {"b": 1}

    def test_top_level_key_wins_when_it_comes_first(self) -> None:
        assert flatten({"a_b": 1, "a": {"b": 2}}) == {"a_b": 1}

    def test_top_level_key_wins_when_it_comes_last(self) -> None:
        assert flatten({"a": {"b": 2, "c": 3}, "a_b": 1}) == {"a_b": 1, "a_c": 3}

    def test_first_flattened_key_wins_between_two_flattened(self) -> None:
        assert flatten({"a_b": {"c": 1}, "a": {"b_c": 2}}) == {"a_b_c": 1}

    def test_empty_top_level_object_does_not_shadow_a_flattened_key(self) -> None:
        # "a_b" is never emitted as a top-level key, so it cannot win.
        assert flatten({"a_b": {}, "a": {"b": 2}}) == {"a_b": 2}

    def test_flat_dict_is_returned_as_is(self) -> None:
        raw = {"a": 1, "b": [1], "c": None}
        assert flatten(raw) is raw

    def test_non_dict_mapping_gives_a_new_dict(self) -> None:
        raw = MappingProxyType({"a": 1, "b": {"c": 2}})
        out = flatten(raw)
        assert type(out) is dict
        assert out == {"a": 1, "b_c": 2}

    def test_only_exact_dicts_count_as_nested_objects(self) -> None:
        ordered = OrderedDict(x=1)
        assert flatten({"a": ordered}) == {"a": ordered}

    def test_input_is_not_modified(self) -> None:
        raw = {"a": {"b": 1}, "c": 2}
        flatten(raw)
        assert raw == {"a": {"b": 1}, "c": 2}


class TestSanitize:
    """Dots and dollars in keys become underscores, values stay, collisions resolve predictably."""

    def test_seed_kitty_key_is_renamed(self) -> None:
        assert sanitize({"^.^": "kitty"}) == ({"^_^": "kitty"}, 1)

    def test_seed_dollar_value_is_kept(self) -> None:
        props = {"currency": "$"}
        out, changed = sanitize(props)
        assert out is props
        assert out == {"currency": "$"}
        assert changed == 0

    def test_every_dot_and_dollar_is_replaced(self) -> None:
        assert sanitize({"a.b$c..": 1, "$": 2}) == ({"a_b_c__": 1, "_": 2}, 2)

    def test_values_are_the_same_objects(self) -> None:
        value = {"x.y": 1}
        out, _ = sanitize({"k.v": value})
        assert out["k_v"] is value
        assert value == {"x.y": 1}

    def test_clean_key_wins_when_it_comes_first(self) -> None:
        assert sanitize({"a_b": "clean", "a.b": "dirty"}) == ({"a_b": "clean"}, 1)

    def test_clean_key_wins_when_it_comes_last(self) -> None:
        assert sanitize({"a.b": "dirty", "a_b": "clean"}) == ({"a_b": "clean"}, 1)

    def test_first_dirty_key_wins_between_two_dirty(self) -> None:
        assert sanitize({"a.b": 1, "a$b": 2}) == ({"a_b": 1}, 2)

    def test_order_is_preserved(self) -> None:
        out, _ = sanitize({"z": 1, "y.y": 2, "x": 3})
        assert list(out) == ["z", "y_y", "x"]

    def test_nothing_to_change_returns_same_object(self) -> None:
        props = {"a": 1, "b_c": 2}
        out, changed = sanitize(props)
        assert out is props
        assert changed == 0

    def test_input_is_not_modified(self) -> None:
        props = {"a.b": 1}
        sanitize(props)
        assert props == {"a.b": 1}


class TestCleanProperties:
    """Properties are flattened first and sanitized second, and non-mappings yield nothing."""

    def test_flatten_then_sanitize(self) -> None:
        assert clean_properties({"x.y": {"z$": 1}}) == ({"x_y_z_": 1}, 1)

    def test_seed_examples_together(self) -> None:
        out, changed = clean_properties(
            {
                "currency": "$",
                "^.^": "kitty",
                "address": {"country": "UK", "city": "London"},
            }
        )
        assert out == {
            "currency": "$",
            "^_^": "kitty",
            "address_country": "UK",
            "address_city": "London",
        }
        assert changed == 1

    def test_flattened_clean_key_beats_a_sanitized_one(self) -> None:
        assert clean_properties({"a.b": 1, "a": {"b": 2}}) == ({"a_b": 2}, 1)

    @pytest.mark.parametrize("raw", [None, [], "props", 3, [("a", 1)]])
    def test_non_mapping_gives_nothing(self, raw: Any) -> None:
        assert clean_properties(raw) == ({}, 0)

    def test_clean_flat_input_is_returned_as_is(self) -> None:
        raw = {"revenue": 9.5, "currency": "$", "tags": ["a"]}
        out, changed = clean_properties(raw)
        assert out is raw
        assert changed == 0


class TestContextExtras:
    """Context becomes flattened, sanitized extras without traits and integrations."""

    CONTEXT: dict[str, Any] = {
        "ip": "203.0.113.7",
        "locale": "en-GB",
        "userAgent": "Mozilla/5.0",
        "os": {"name": "iOS", "version": "17.1"},
        "page": {"url": "https://shop.example/cart", "path": "/cart"},
        "library": {"name": "analytics.js", "version": "4.1.0"},
        "traits": {"email": "a@example.com", "plan": "pro"},
        "integrations": {"All": True},
        "campaign.source": "news$letter",
    }

    def test_documented_shape(self) -> None:
        extras, changed = context_extras(self.CONTEXT)
        assert extras == {
            "ip": "203.0.113.7",
            "locale": "en-GB",
            "userAgent": "Mozilla/5.0",
            "os_name": "iOS",
            "os_version": "17.1",
            "page_url": "https://shop.example/cart",
            "page_path": "/cart",
            "library_name": "analytics.js",
            "library_version": "4.1.0",
            "campaign_source": "news$letter",
        }
        assert changed == 1

    def test_traits_and_integrations_are_excluded(self) -> None:
        assert {"traits", "integrations"} == CONTEXT_EXCLUDED
        extras, _ = context_extras(self.CONTEXT)
        assert not any(k.startswith(("traits", "integrations")) for k in extras)
        assert "email" not in extras

    def test_result_is_never_the_context_itself(self) -> None:
        context = {"ip": "1.2.3.4"}
        extras, _ = context_extras(context)
        assert extras == context
        assert extras is not context

    @pytest.mark.parametrize("context", [None, "ctx", ["ip"]])
    def test_missing_or_malformed_context_gives_nothing(self, context: Any) -> None:
        assert context_extras(context) == ({}, 0)

    def test_input_is_not_modified(self) -> None:
        context = {"os": {"name": "iOS"}, "traits": {"a": 1}}
        context_extras(context)
        assert context == {"os": {"name": "iOS"}, "traits": {"a": 1}}


class TestEventProperties:
    """Event properties are context extras overlaid by the event's own cleaned properties."""

    def test_event_property_wins_over_context_extra(self) -> None:
        props, _ = event_properties(
            {"page_url": "from-event", "ip": "9.9.9.9"},
            {"page": {"url": "from-context"}, "ip": "1.1.1.1", "locale": "en"},
        )
        assert props == {"page_url": "from-event", "ip": "9.9.9.9", "locale": "en"}

    def test_sanitized_event_property_still_wins(self) -> None:
        props, changed = event_properties({"page.url": "event"}, {"page": {"url": "context"}})
        assert props == {"page_url": "event"}
        assert changed == 1

    def test_counts_sanitized_keys_from_both_parts(self) -> None:
        _, changed = event_properties({"a.b": 1, "c$": 2}, {"d.e": 3})
        assert changed == 3

    def test_context_traits_do_not_leak_into_events(self) -> None:
        props, _ = event_properties({"x": 1}, {"traits": {"email": "e"}, "integrations": {}})
        assert props == {"x": 1}

    def test_no_context(self) -> None:
        assert event_properties({"a": {"b": 1}}, None) == ({"a_b": 1}, 0)

    def test_no_properties(self) -> None:
        assert event_properties(None, {"ip": "1.1.1.1"}) == ({"ip": "1.1.1.1"}, 0)

    def test_neither(self) -> None:
        assert event_properties(None, None) == ({}, 0)

    def test_caller_properties_are_not_modified(self) -> None:
        properties = {"revenue": 10}
        context = {"ip": "1.1.1.1"}
        event_properties(properties, context)
        assert properties == {"revenue": 10}
        assert context == {"ip": "1.1.1.1"}


class TestGroupProperties:
    """Group traits become group_-prefixed customer properties next to an authoritative group_id."""

    def test_prefixing_and_flattening(self) -> None:
        props, changed = group_properties(
            "g-1", {"name": "Acme", "address": {"city": "Brno"}, "plan.tier": "gold"}
        )
        assert props == {
            "group_id": "g-1",
            "group_name": "Acme",
            "group_address_city": "Brno",
            "group_plan_tier": "gold",
        }
        assert changed == 1

    def test_explicit_group_id_wins_over_trait_id(self) -> None:
        props, _ = group_properties("g-1", {"id": "other", "name": "Acme"})
        assert props == {"group_id": "g-1", "group_name": "Acme"}

    @pytest.mark.parametrize("traits", [None, {}, "nope"])
    def test_no_traits(self, traits: Any) -> None:
        assert group_properties("g-1", traits) == ({"group_id": "g-1"}, 0)


class TestLimitExceeded:
    """The refusal carries a one-line reason and a stable code, and survives pickling."""

    def test_fields_and_str(self) -> None:
        error = LimitExceeded("too many", "event_type_limit")
        assert error.reason == "too many"
        assert error.code == "event_type_limit"
        assert str(error) == "too many"

    def test_pickle_round_trip(self) -> None:
        error = pickle.loads(pickle.dumps(LimitExceeded("too many", "event_type_limit")))
        assert (error.reason, error.code) == ("too many", "event_type_limit")


class TestLimits:
    """Limits default to Infinario's 255 and reject nonsense values."""

    def test_defaults(self) -> None:
        assert Limits() == Limits(customer_keys=255, event_keys=255, event_types=255)

    @pytest.mark.parametrize("value", [-1, 1.5, "3", True])
    def test_invalid(self, value: Any) -> None:
        with pytest.raises(ValueError):
            Limits(event_types=value)


class TestSchemaEventTypes:
    """A new event type past the type limit is refused and leaves nothing recorded."""

    def test_refusal_leaves_nothing_recorded(self) -> None:
        schema = Schema(Limits(event_types=2))
        for event_type in ("a", "b"):
            schema.admit_event(event_type, {"k": 1})
        schema.drain_new()
        before = schema.report()
        with pytest.raises(LimitExceeded) as info:
            schema.admit_event("c", {"k": 1})
        assert info.value.code == "event_type_limit"
        assert "'c'" in info.value.reason
        assert "\n" not in info.value.reason
        assert schema.drain_new() == []
        after = schema.report()
        assert after["event_types"] == before["event_types"] == 2
        assert "c" not in after["event_keys"]
        assert after["refused_event_types"] == {"c": 1}
        assert after["refused_total"] == 1

    def test_known_types_still_pass_when_full(self) -> None:
        schema = Schema(Limits(event_types=1))
        schema.admit_event("a", {})
        props = {"k": 1}
        assert schema.admit_event("a", props) == (props, [])

    def test_refusal_with_empty_properties(self) -> None:
        schema = Schema(Limits(event_types=0))
        with pytest.raises(LimitExceeded):
            schema.admit_event("a", {})

    def test_refused_type_names_are_bounded_but_counted(self) -> None:
        schema = Schema(Limits(event_types=0))
        total = REPORT_SAMPLES + 10
        for i in range(total):
            with pytest.raises(LimitExceeded):
                schema.admit_event(f"t{i}", {})
        report = schema.report()
        assert len(report["refused_event_types"]) == REPORT_SAMPLES
        assert report["refused_total"] == total


class TestSchemaEventKeys:
    """Per-type property keys past the limit are dropped while known keys always pass."""

    def test_new_keys_past_the_limit_are_dropped_in_order(self) -> None:
        schema = Schema(Limits(event_keys=2))
        kept, dropped = schema.admit_event("buy", {"a": 1, "b": 2, "c": 3, "d": None})
        assert kept == {"a": 1, "b": 2}
        assert dropped == ["c", "d"]

    def test_known_keys_pass_and_return_the_same_dict(self) -> None:
        schema = Schema(Limits(event_keys=2))
        schema.admit_event("buy", {"a": 1, "b": 2})
        props = {"b": 5, "a": 6}
        kept, dropped = schema.admit_event("buy", props)
        assert kept is props
        assert dropped == []

    def test_mixed_known_and_new_keys(self) -> None:
        schema = Schema(Limits(event_keys=2))
        schema.admit_event("buy", {"a": 1, "b": 2})
        kept, dropped = schema.admit_event("buy", {"z": 0, "a": 1, "b": 2})
        assert kept == {"a": 1, "b": 2}
        assert dropped == ["z"]

    def test_none_values_count_as_keys(self) -> None:
        schema = Schema(Limits(event_keys=1))
        schema.admit_event("buy", {"a": None})
        assert schema.admit_event("buy", {"b": 1}) == ({}, ["b"])

    def test_limit_is_per_event_type(self) -> None:
        schema = Schema(Limits(event_keys=1))
        schema.admit_event("one", {"a": 1})
        assert schema.admit_event("two", {"b": 1}) == ({"b": 1}, [])

    def test_input_is_not_modified_when_dropping(self) -> None:
        schema = Schema(Limits(event_keys=0))
        props = {"a": 1}
        schema.admit_event("buy", props)
        assert props == {"a": 1}

    def test_drops_are_reported(self) -> None:
        schema = Schema(Limits(event_keys=1))
        schema.admit_event("buy", {"a": 1, "b": 2})
        schema.admit_event("buy", {"b": 2, "c": 3})
        report = schema.report()
        assert report["event_keys"] == {"buy": 1}
        assert report["dropped_event_keys"] == {"buy": {"count": 3, "keys": ["b", "c"]}}


class TestSchemaCustomerKeys:
    """Customer property keys past the limit are dropped while known keys always pass."""

    def test_dropping_and_known_keys(self) -> None:
        schema = Schema(Limits(customer_keys=2))
        kept, dropped = schema.admit_customer({"email": "e", "plan": None, "age": 30})
        assert kept == {"email": "e", "plan": None}
        assert dropped == ["age"]
        props = {"plan": "pro"}
        assert schema.admit_customer(props) == (props, [])
        assert schema.admit_customer(props)[0] is props

    def test_customer_and_event_keys_are_separate(self) -> None:
        schema = Schema(Limits(customer_keys=1, event_keys=1))
        schema.admit_event("buy", {"a": 1})
        assert schema.admit_customer({"b": 1}) == ({"b": 1}, [])

    def test_drops_are_reported(self) -> None:
        schema = Schema(Limits(customer_keys=0))
        schema.admit_customer({"a": 1})
        report = schema.report()
        assert report["customer_keys"] == 0
        assert report["dropped_customer_keys"] == {"count": 1, "keys": ["a"]}


class TestSchemaPersistence:
    """drain_new yields exactly the new rows, and loading them restores the same limits."""

    def test_drain_new_rows_and_format(self) -> None:
        schema = Schema()
        schema.admit_event("buy", {"a": 1})
        schema.admit_customer({"email": "e"})
        assert schema.drain_new() == [
            ("type", "buy", ""),
            ("event_key", "buy", "a"),
            ("customer_key", "", "email"),
        ]
        assert schema.drain_new() == []
        schema.admit_event("buy", {"a": 2})
        assert schema.drain_new() == []

    def test_round_trip_restores_the_same_limits(self) -> None:
        limits = Limits(customer_keys=2, event_keys=2, event_types=2)
        first = Schema(limits)
        first.admit_event("buy", {"a": 1, "b": 2})
        first.admit_event("view", {})
        first.admit_customer({"email": "e", "plan": "p"})
        rows = first.drain_new()

        second = Schema(limits)
        for row in rows:
            second.load(*row)
        assert second.drain_new() == []
        report = second.report()
        assert report["event_types"] == 2
        assert report["event_keys"] == {"buy": 2, "view": 0}
        assert report["customer_keys"] == 2
        props = {"a": 1, "b": 2}
        assert second.admit_event("buy", props)[0] is props
        assert second.admit_event("buy", {"c": 3}) == ({}, ["c"])
        assert second.admit_event("view", {"x": 1, "y": 2, "z": 3}) == (
            {"x": 1, "y": 2},
            ["z"],
        )
        assert second.admit_customer({"age": 1}) == ({}, ["age"])
        with pytest.raises(LimitExceeded):
            second.admit_event("new", {})

    def test_event_key_row_implies_its_type(self) -> None:
        schema = Schema(Limits(event_types=1))
        schema.load("event_key", "buy", "a")
        assert schema.report()["event_types"] == 1
        with pytest.raises(LimitExceeded):
            schema.admit_event("other", {})

    def test_loading_past_lowered_limits_keeps_known_and_admits_nothing_new(self) -> None:
        schema = Schema(Limits(event_keys=1))
        for key in ("a", "b", "c"):
            schema.load("event_key", "buy", key)
        props = {"a": 1, "b": 2, "c": 3}
        assert schema.admit_event("buy", props) == (props, [])
        assert schema.admit_event("buy", {"d": 4}) == ({}, ["d"])

    def test_unknown_row_kind(self) -> None:
        with pytest.raises(ValueError):
            Schema().load("mystery", "", "")


class TestEventPolicy:
    """Renames map Segment names to Infinario types and 'campaign' is refused unless allowed."""

    def test_default_is_identity(self) -> None:
        assert EventPolicy().event_type("Product Viewed") == "Product Viewed"

    def test_rename(self) -> None:
        policy = EventPolicy(renames={"Order Completed": "hard_purchase"})
        assert policy.event_type("Order Completed") == "hard_purchase"
        assert policy.event_type("Cart Viewed") == "Cart Viewed"

    def test_campaign_is_refused(self) -> None:
        with pytest.raises(LimitExceeded) as info:
            EventPolicy().event_type("campaign")
        assert info.value.code == "reserved_event_type"
        assert info.value.reason == (
            "event type 'campaign' is reserved for Infinario's campaign module; "
            "rename it or set allow_campaign"
        )

    def test_rename_into_campaign_is_refused(self) -> None:
        with pytest.raises(LimitExceeded):
            EventPolicy(renames={"Promo": "campaign"}).event_type("Promo")

    def test_rename_away_from_campaign_is_accepted(self) -> None:
        policy = EventPolicy(renames={"campaign": "marketing_campaign"})
        assert policy.event_type("campaign") == "marketing_campaign"

    def test_allow_campaign(self) -> None:
        assert EventPolicy(allow_campaign=True).event_type("campaign") == "campaign"

    def test_reserved_name_is_exact(self) -> None:
        assert EventPolicy().event_type("Campaign") == "Campaign"

    def test_renames_are_a_read_only_copy(self) -> None:
        source = {"a": "b"}
        policy = EventPolicy(renames=source)
        source["a"] = "c"
        assert policy.event_type("a") == "b"
        with pytest.raises(TypeError):
            policy.renames["x"] = "y"  # type: ignore[index]

    def test_equal_policies_hash_equal(self) -> None:
        first = EventPolicy(renames={"a": "b"})
        second = EventPolicy(renames={"a": "b"})
        assert first == second
        assert hash(first) == hash(second)

    @pytest.mark.parametrize("renames", [{"a": ""}, {"a": 1}, {1: "a"}])
    def test_invalid_renames(self, renames: Any) -> None:
        with pytest.raises(ValueError):
            EventPolicy(renames=renames)


class TestProperties:
    """For arbitrary JSON payloads, cleaning yields legal keys and unaltered values."""

    @settings(deadline=None)
    @given(payloads)
    def test_output_keys_never_contain_dot_or_dollar(self, raw: dict[str, Any]) -> None:
        out, _ = clean_properties(raw)
        assert not any("." in k or "$" in k for k in out)

    @settings(deadline=None)
    @given(payloads)
    def test_values_are_never_altered(self, raw: dict[str, Any]) -> None:
        candidates = first_two_levels(raw)
        out, _ = clean_properties(raw)
        for value in out.values():
            assert any(value is c for c in candidates)

    @settings(deadline=None)
    @given(payloads)
    def test_no_nested_objects_remain_from_the_first_level(self, raw: dict[str, Any]) -> None:
        out, _ = clean_properties(raw)
        top_level_objects = [v for v in raw.values() if isinstance(v, dict)]
        for value in out.values():
            assert not any(value is obj for obj in top_level_objects)

    @settings(deadline=None)
    @given(st.dictionaries(clean_keys, scalars | st.lists(scalars, max_size=2), max_size=8))
    def test_clean_input_passes_through_unchanged(self, raw: dict[str, Any]) -> None:
        out, changed = clean_properties(raw)
        assert out is raw
        assert changed == 0

    @settings(deadline=None)
    @given(payloads)
    def test_sanitizing_is_idempotent(self, raw: dict[str, Any]) -> None:
        # Only sanitizing: cleaning again would flatten objects that were two
        # levels deep, which is the intended one-level-per-pass behaviour.
        once, _ = clean_properties(raw)
        twice, changed = sanitize(once)
        assert changed == 0
        assert twice is once

    @settings(deadline=None)
    @given(st.dictionaries(keys, scalars | st.dictionaries(keys, scalars, max_size=3), max_size=8))
    def test_cleaning_two_level_payloads_is_idempotent(self, raw: dict[str, Any]) -> None:
        once, _ = clean_properties(raw)
        twice, changed = clean_properties(once)
        assert changed == 0
        assert twice is once

    @settings(deadline=None)
    @given(payloads)
    def test_count_matches_dirty_keys_after_flattening(self, raw: dict[str, Any]) -> None:
        flat = flatten(raw)
        _, changed = sanitize(flat)
        assert changed == sum(1 for k in flat if "." in k or "$" in k)

    @settings(deadline=None)
    @given(payloads)
    def test_clean_keys_keep_their_values(self, raw: dict[str, Any]) -> None:
        flat = flatten(raw)
        out, _ = sanitize(flat)
        for key, value in flat.items():
            if "." not in key and "$" not in key:
                assert out[key] is value

    @settings(deadline=None)
    @given(payloads)
    def test_top_level_scalars_survive_flattening(self, raw: dict[str, Any]) -> None:
        out = flatten(raw)
        for key, value in raw.items():
            if not isinstance(value, dict):
                assert out[key] is value

    @settings(deadline=None)
    @given(
        st.lists(st.dictionaries(st.sampled_from("abcdefgh"), st.integers(), max_size=6)),
        st.integers(min_value=0, max_value=5),
    )
    def test_schema_never_exceeds_the_key_limit(
        self, batches: list[dict[str, int]], limit: int
    ) -> None:
        schema = Schema(Limits(event_keys=limit))
        for props in batches:
            kept, dropped = schema.admit_event("t", props)
            assert kept.keys().isdisjoint(dropped)
            assert set(kept) | set(dropped) == set(props)
            assert all(kept[k] is props[k] for k in kept)
        assert schema.report()["event_keys"].get("t", 0) <= limit


class TestExtrasCache:
    """Extras remembered by the context's bytes equal fresh ones, and are the caller's own."""

    def test_same_result_fresh_dict_bounded(self) -> None:
        from router.mapping import ExtrasCache

        cache = ExtrasCache(size=4)
        context = {"os": {"name": "iOS"}, "ip": "1.2.3.4", "a.b": 1, "traits": {"x": 1}}
        first, changed = cache(context, 17)
        assert (first, changed) == context_extras(context)
        first["added"] = True
        again, _ = cache(context, 17)
        assert "added" not in again
        for n in range(10):
            cache({"n": n}, n)
        assert len(cache._entries) <= 4
        assert cache(context, None) == context_extras(context)
