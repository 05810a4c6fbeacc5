"""The `klaviyo_server` fixture; a test module asks for it with
`pytest_plugins = ["tests.conftest_klaviyo"]`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.klaviyo_server import KlaviyoTestServer


@pytest.fixture
def klaviyo_server() -> Iterator[KlaviyoTestServer]:
    """A running local Klaviyo whose clock runs 60 times faster (a rate-limit minute is 1 s)."""
    with KlaviyoTestServer(time_scale=60.0) as server:
        yield server
