"""Segment messages and request bodies for the benchmark, built cheaply.

Every message is one of a fixed set of templates encoded to JSON once, with
``%(x)b`` slots where the per-message values go (message id, user and anonymous
ids, group id, timestamp). Building a message is then a single bytes ``%``
format in C, so the load generator spends its time on the network rather than
on JSON.

The data follows what Segment's libraries send: a ``context`` with ip,
userAgent, locale, library, os, device and page; ``properties`` with a nested
object (unpacked one level by the relay); identify traits with an address.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

WRITE_KEY = "bench"
PROJECT = "bench-project"
BASIC_AUTH = b"Basic " + base64.b64encode(f"{WRITE_KEY}:".encode())

# Out of every 100 messages: 60 track, 25 page/screen, 10 identify, 5 group/alias.
MIX = {"track": 60, "page": 18, "screen": 7, "identify": 10, "group": 3, "alias": 2}
EVENTS = [
    "Product Viewed", "Product Added", "Product Removed", "Cart Viewed", "Checkout Started",
    "Order Completed", "Products Searched", "Signed Up", "Signed In", "Video Played",
    "Newsletter Subscribed", "Coupon Applied",
]
VARIANTS = 16
# Every fourth customer browses anonymously: its track/page/screen calls carry only
# the anonymousId until an identify links it to its userId.
ANONYMOUS_EVERY = 4
# Multiplier of the customer permutation (a prime, coprime with any 2^a 5^b count):
# consecutive messages go to customers spread over the whole population.
_SPREAD = 2654435761

_SLOTS = {"@MID@": "m", "@UID@": "u", "@AID@": "a", "@GID@": "g", "@TS@": "t"}
_encode = msgspec.json.encode


def _context(rng: random.Random, mobile: bool, n: int) -> dict[str, Any]:
    if mobile:
        library = {"name": "analytics-ios", "version": "4.1.8"}
        os_ = {"name": "iOS", "version": rng.choice(["16.7", "17.1", "17.2"])}
        device = {"type": "ios", "manufacturer": "Apple", "model": rng.choice(["iPhone14,5",
                                                                               "iPhone15,2"])}
    else:
        library = {"name": "analytics.js", "version": "next-1.64.0"}
        os_ = {"name": rng.choice(["Mac OS X", "Windows", "Linux"]), "version": "10.15.7"}
        device = {"type": "desktop", "manufacturer": "Apple", "model": "MacBookPro18,3"}
    path = f"/products/{1000 + n}"
    return {
        "ip": f"203.0.113.{n % 250 + 1}",
        "userAgent": ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
                      "(KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36"),
        "locale": rng.choice(["en-US", "en-GB", "de-DE", "cs-CZ", "sk-SK"]),
        "library": library,
        "os": os_,
        "device": device,
        "page": {"path": path, "referrer": "https://www.google.com/", "search": "?ref=bench",
                 "title": f"Product {1000 + n} | Shop",
                 "url": f"https://shop.example.com{path}?ref=bench"},
    }


def _properties(rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "product_id": f"p-{1000 + n}",
        "sku": f"SKU-{rng.randrange(10**6):06d}",
        "price": round(rng.uniform(1, 500), 2),
        "quantity": rng.randrange(1, 5),
        "currency": "USD",
        "product": {"name": f"Product {1000 + n}", "category": rng.choice(["Shoes", "Books",
                                                                             "Games"]),
                    "brand": "Bench", "variant": rng.choice(["red", "blue", "green"])},
        "tags": ["sale", "new"],
    }


def _traits(rng: random.Random, n: int) -> dict[str, Any]:
    return {
        "email": "@UID@@example.com", "first_name": rng.choice(["Ada", "Alan", "Grace"]),
        "last_name": rng.choice(["Lovelace", "Turing", "Hopper"]), "plan": "pro",
        "logins": rng.randrange(1, 100),
        "address": {"city": rng.choice(["London", "Prague", "Berlin"]), "country": "UK",
                    "postal_code": f"{10000 + n}"},
        "created_at": "2023-04-01T10:00:00Z",
    }


def _message(kind: str, rng: random.Random, n: int, anonymous: bool) -> dict[str, Any]:
    """One message with placeholder strings where the per-message values go."""
    ids: dict[str, Any] = {"anonymousId": "@AID@"} if anonymous else {
        "userId": "@UID@", "anonymousId": "@AID@"}
    msg: dict[str, Any] = {"type": kind, "messageId": "@MID@", **ids, "timestamp": "@TS@"}
    mobile = kind == "screen"
    if kind == "track":
        msg["event"] = EVENTS[n % len(EVENTS)]
        msg["properties"] = _properties(rng, n)
    elif kind in ("page", "screen"):
        msg["name"] = f"Product {1000 + n}"
        msg["category"] = "Catalog"
        msg["properties"] = {"path": f"/products/{1000 + n}", "experiment": {
            "name": "checkout-v2", "arm": rng.choice(["a", "b"])}}
    elif kind == "identify":
        msg["traits"] = _traits(rng, n)
    elif kind == "group":
        msg["groupId"] = "@GID@"
        msg["traits"] = {"name": "Company @GID@", "industry": "Retail", "employees": 120,
                         "plan": "enterprise", "address": {"city": "Prague"}}
    elif kind == "alias":
        msg = {"type": "alias", "messageId": "@MID@", "userId": "@UID@", "previousId": "@AID@",
               "timestamp": "@TS@"}
    msg["context"] = _context(rng, mobile, n)
    msg["integrations"] = {}
    return msg


def template(message: dict[str, Any]) -> bytes:
    """JSON bytes with ``%(x)b`` slots for the placeholder strings."""
    raw = _encode(message).replace(b"%", b"%%")
    for placeholder, slot in _SLOTS.items():
        raw = raw.replace(placeholder.encode(), b"%(" + slot.encode() + b")b")
    return raw


@dataclass(frozen=True)
class Template:
    kind: str
    raw: bytes


def build_templates(seed: int = 7) -> tuple[list[Template], list[Template]]:
    """The 100-message mix, in a shuffled order, for known and anonymous customers."""
    rng = random.Random(seed)
    kinds = [kind for kind, count in MIX.items() for _ in range(count)]
    rng.shuffle(kinds)
    known: list[Template] = []
    anonymous: list[Template] = []
    for v in range(VARIANTS):
        for i, kind in enumerate(kinds):
            n = v * len(kinds) + i
            known.append(Template(kind, template(_message(kind, rng, n, False))))
            anonymous.append(Template(kind, template(_message(
                kind, rng, n, kind in ("track", "page", "screen")))))
    return known, anonymous


def now_iso() -> bytes:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()


class Messages:
    """Message ``k`` of a run: its template, its customer and its unique messageId.

    ``customers`` distinct customers are visited in a fixed pseudo-random
    permutation, each once per ``customers`` messages, so a run of ``c *
    customers`` messages gives every customer ``c`` calls.
    """

    def __init__(self, *, customers: int, id_prefix: str, seq_start: int = 0,
                 seed: int = 7) -> None:
        self.customers = customers
        self.prefix = id_prefix.encode()
        self.seq = seq_start
        self.known, self.anonymous = build_templates(seed)
        self.stamp = now_iso()

    def customer(self, k: int) -> int:
        return (k * _SPREAD) % self.customers

    def next(self) -> tuple[Template, bytes]:
        """The next message: its template and its JSON bytes."""
        k = self.seq
        self.seq = k + 1
        c = self.customer(k)
        pool = self.anonymous if c % ANONYMOUS_EVERY == ANONYMOUS_EVERY - 1 else self.known
        tpl = pool[k % len(pool)]
        cid = b"%d" % c
        raw = tpl.raw % {b"m": self.prefix + b"%d" % k, b"u": b"u-" + cid, b"a": b"a-" + cid,
                         b"g": b"g-%d" % (c % 500), b"t": self.stamp}
        return tpl, raw

    def refresh_clock(self) -> None:
        """Messages carry the time of the body they are in (analytics.js stamps at the call)."""
        self.stamp = now_iso()


def batch_body(messages: Messages, size: int) -> bytes:
    messages.refresh_clock()
    parts = [messages.next()[1] for _ in range(size)]
    return (b'{"batch":[' + b",".join(parts) + b'],"sentAt":"' + messages.stamp
            + b'","writeKey":"' + WRITE_KEY.encode() + b'"}')


def single_body(messages: Messages) -> tuple[str, bytes]:
    """One message for ``/v1/<type>`` (Segment's webhook destination posts these)."""
    messages.refresh_clock()
    tpl, raw = messages.next()
    return f"/v1/{tpl.kind}", raw


BodyFactory = Callable[[], tuple[str, bytes, int]]


def body_factory(messages: Messages, kind: str, batch_size: int) -> BodyFactory:
    """``() -> (path, body, message count)`` for ``kind`` ``batch`` or ``single``."""
    if kind == "batch":
        return lambda: ("/v1/batch", batch_body(messages, batch_size), batch_size)
    if kind == "single":
        def single() -> tuple[str, bytes, int]:
            path, body = single_body(messages)
            return path, body, 1
        return single
    raise ValueError(f"unknown body kind {kind!r}")


# --- the legacy bulk bodies the relay would send for these messages (codec floor) ---

def _flatten(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if type(value) is dict:
            for sub, inner in value.items():
                out.setdefault(f"{key}_{sub}", inner)
        else:
            out[key] = value
    return out


def legacy_command(message: dict[str, Any]) -> dict[str, Any]:
    """A close stand-in for the legacy ``/bulk`` command one message becomes."""
    kind = message["type"]
    ids = {"registered": message.get("userId"), "cookie": message.get("anonymousId")}
    ids = {k: v for k, v in ids.items() if v is not None}
    extras = _flatten({k: v for k, v in message.get("context", {}).items()
                       if k not in ("traits", "integrations")})
    if kind in ("identify", "group", "alias"):
        props = _flatten(message.get("traits", {}))
        if kind == "group":
            props = {"group_id": message["groupId"], **{f"group_{k}": v for k, v in props.items()}}
        if kind == "alias":
            ids = {"registered": message["userId"], "cookie": message["previousId"]}
        return {"name": "crm/customers", "data": {"ids": ids, "project_id": PROJECT,
                                                  "properties": props}}
    props = {**extras, **_flatten(message.get("properties", {}))}
    event_type = message.get("event") or f"{kind}_visit"
    return {"name": "crm/events", "data": {"customer_ids": ids, "project_id": PROJECT,
                                           "type": event_type, "properties": props,
                                           "timestamp": 1700000000.123}}


def legacy_bodies(messages: list[dict[str, Any]], per_body: int = 50) -> Iterator[
        dict[str, Any]]:
    for i in range(0, len(messages), per_body):
        yield {"commands": [legacy_command(m) for m in messages[i:i + per_body]]}
