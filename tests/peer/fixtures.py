"""walkerOS's test fixtures `createEvent` / `getEvent` (packages/core/src/eventGenerator.ts) in
Python, as walkeros.md §1.4 describes them: `props` override whole sections (shallow), and a name
with two words sets `entity` / `action`.

Two values are fixed here where walkerOS draws them: the `id` (random) and the `timestamp` (today
at 00:13:37 local time). The peer cases only compare them against the fixture itself.
"""

from __future__ import annotations

import copy
from typing import Any

from transforms.walkeros.jsvalues import UNDEFINED

FIXTURE_ID = "0f1e2d3c4b5a6978"
FIXTURE_TIMESTAMP = 1735690417000  # 2025-01-01T00:13:37Z
TRACE = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"

P1 = {"id": "ers", "name": "Everyday Ruck Snack", "color": "black", "size": "l", "price": 420}
P2 = {"id": "cc", "name": "Cool Cap", "size": "one size", "price": 42}
SHOP = {"pagegroup": "shop"}


def _base() -> dict[str, Any]:
    return {
        "name": "entity action", "entity": "entity", "action": "action",
        "data": {"string": "foo", "number": 1, "boolean": True, "array": [0, "text", False],
                 "not": UNDEFINED},
        "context": {"dev": ["test", 1]},
        "globals": {"lang": "elb"},
        "custom": {"completely": "random"},
        "user": {"id": "us3r", "device": "c00k13", "session": "s3ss10n"},
        "nested": [{"entity": "child", "data": {"is": "subordinated"}}],
        "consent": {"functional": True},
        "id": FIXTURE_ID,
        "trigger": "test",
        "timestamp": FIXTURE_TIMESTAMP,
        "timing": 3.14,
        "source": {"type": "collector", "schema": "4"},
    }


def create_event(props: dict[str, Any] | None = None) -> dict[str, Any]:
    """`createEvent(props)`: the base event with `props` applied section by section."""
    props = copy.deepcopy(props or {})
    event = {**_base(), **props}
    if not props.get("timestamp"):
        event["timestamp"] = FIXTURE_TIMESTAMP
    event["source"] = {"count": 1, "trace": TRACE, **event["source"]}
    words = event["name"].split(" ")
    if len(words) >= 2:
        event["entity"], event["action"] = words[0], words[1]
    return event


def _entity(name: str, data: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    return {"entity": name, "data": dict(data), "context": context, "nested": []}


def _defaults(name: str) -> dict[str, Any]:
    """The per-name defaults the peer cases use (walkeros.md §1.4 table)."""
    if name == "order complete":
        context = {"shopping": ["complete", 0]}
        return {"data": {"id": "0rd3r1d", "currency": "EUR", "shipping": 5.22, "taxes": 73.76,
                         "total": 555},
                "context": context, "globals": SHOP, "trigger": "load",
                "nested": [_entity("product", P1, context), _entity("product", P2, context),
                           _entity("gift", {"name": "Surprise"}, context)]}
    if name == "product view":
        return {"data": dict(P1), "context": {"shopping": ["detail", 0]}, "globals": SHOP,
                "nested": [], "trigger": "load"}
    if name == "page view":
        return {"data": {"domain": "www.example.com", "title": "walkerOS documentation",
                         "referrer": "https://www.walkeros.io/", "search": "?foo=bar",
                         "hash": "#hash", "id": "/docs/"},
                "globals": {"pagegroup": "docs"}, "trigger": "load"}
    return {}  # an unknown name gets the pure base event


def get_event(name: str = "entity action", props: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """`getEvent(name, props)`: the per-name defaults, then `props`, then `createEvent`."""
    return create_event({**copy.deepcopy(_defaults(name)), **(props or {}), "name": name})
