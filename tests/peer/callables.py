"""The JavaScript functions of walkerOS's tests, as Python callables `(value, context)`.

Peer cases name them as `"$py:tests.peer.callables:<name>"`, the syntax the config loader takes
(port.md D7). Each records its calls in `CALLS`, so a case can assert what jest's `jest.fn()`
mocks assert: how often a callback ran and with what.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

CALLS: dict[str, list[tuple[Any, Any]]] = defaultdict(list)


class Boom(Exception):
    """What the tests' throwing callbacks raise (`new Error('boom')`)."""


def _record(name: str, value: Any, context: Any) -> None:
    CALLS[name].append((value, context))


def _get(value: Any, *path: str) -> Any:
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def globals_env_is_prod(event: Any, context: Any) -> bool:
    _record("globals_env_is_prod", event, context)
    return _get(event, "globals", "env") == "prod"


def always_true(value: Any, context: Any) -> bool:
    _record("always_true", value, context)
    return True


def always_false(value: Any, context: Any) -> bool:
    _record("always_false", value, context)
    return False


def raise_boom(value: Any, context: Any) -> Any:
    _record("raise_boom", value, context)
    raise Boom("boom")


def foo_for_page_view(value: Any, context: Any) -> str:
    """mapping.test `fn`: 'foo' for a page view, else 'bar'."""
    _record("foo_for_page_view", value, context)
    return "foo" if _get(value, "name") == "page view" else "bar"


def is_product(entity: Any, context: Any) -> bool:
    return _get(entity, "entity") == "product"


def identity(value: Any, context: Any) -> Any:
    return value


def fn_string(value: Any, context: Any) -> str:
    return "fn"


def is_string(value: Any, context: Any) -> bool:
    _record("is_string", value, context)
    return isinstance(value, str)


def name_is_page_view(event: Any, context: Any) -> bool:
    _record("name_is_page_view", event, context)
    return _get(event, "name") == "page view"


def event_is_no_pe(event: Any, context: Any) -> bool:
    """mapping.test 'mapping array': `'event' in event && event.event === 'no pe'`."""
    return _get(event, "event") == "no pe"


def returns_nothing(value: Any, context: Any) -> None:
    """A bare `jest.fn()`: returns undefined."""
    _record("returns_nothing", value, context)


def value_and_event_name(value: Any, context: Any) -> str:
    _record("value_and_event_name", value, context)
    return f"{value}:{_get(context.event, 'name')}"


def consent_functional(value: Any, context: Any) -> bool:
    _record("consent_functional", value, context)
    return _get(context.consent, "functional") is True


def fn_won(value: Any, context: Any) -> str:
    _record("fn_won", value, context)
    return "FN_WON"


def returns_x(value: Any, context: Any) -> str:
    _record("returns_x", value, context)
    return "x"


def upper_title(event: Any, context: Any) -> Any:
    title = _get(event, "data", "title")
    return title.upper() if isinstance(title, str) else None


def product_prefixed_id(event: Any, context: Any) -> Any:
    product = _get(event, "data", "id")
    return f"PRODUCT_{product}" if isinstance(product, str) else None


def _total(event: Any) -> Any:
    total = _get(event, "data", "total")
    return total if isinstance(total, int | float) and not isinstance(total, bool) else None


def total_doubled(event: Any, context: Any) -> Any:
    total = _total(event)
    return None if total is None else total * 2


def total_plus_50(event: Any, context: Any) -> Any:
    total = _total(event)
    return None if total is None else total + 50


def value_over_50(event: Any, context: Any) -> bool:
    value = _get(event, "data", "value")
    return isinstance(value, int | float) and value > 50


def lower_email(event: Any, context: Any) -> Any:
    email = _get(event, "user", "email")
    return email.lower() if isinstance(email, str) else None


def lower_data_email(event: Any, context: Any) -> Any:
    email = _get(event, "data", "email")
    return email.lower() if isinstance(email, str) else None
