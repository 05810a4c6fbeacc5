"""Packing planned calls into bulk requests, and mapping rejections back to the calls."""

from __future__ import annotations

import json
from typing import Any

from transforms.klaviyo.bulk import (
    EventBatch,
    ProfileBatch,
    plan_event_batches,
    plan_profile_batches,
)

ROOT = "/data/attributes/events-bulk-create/data"


def event(
    unique_id: str | None, email: str = "a@example.com", metric: str = "Order", **properties: Any
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "profile": {"data": {"type": "profile", "attributes": {"email": email}}},
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "properties": properties,
        "time": "2024-08-01T00:00:00.123Z",
    }
    if unique_id is not None:
        attributes["unique_id"] = unique_id
    return {"data": {"type": "event", "attributes": attributes}}


def profile(email: str, **attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": {"email": email, **attributes}}}


def entries(batch: EventBatch) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = batch.body()["data"]["attributes"]["events-bulk-create"]["data"]
    return entries


def test_events_are_grouped_per_profile_in_first_seen_order() -> None:
    plan = plan_event_batches(
        [event("1", "a@x.co"), event("2", "b@x.co"), event("3", "a@x.co", metric="View")]
    )

    (batch,) = plan.batches
    body = batch.body()
    assert body["data"]["type"] == "event-bulk-create-job"
    grouped = [
        (
            entry["attributes"]["profile"]["data"]["attributes"]["email"],
            [e["attributes"]["unique_id"] for e in entry["attributes"]["events"]["data"]],
        )
        for entry in entries(batch)
    ]
    assert grouped == [("a@x.co", ["1", "3"]), ("b@x.co", ["2"])]
    for entry in entries(batch):
        assert entry["type"] == "event-bulk-create"
        for inner in entry["attributes"]["events"]["data"]:
            assert inner["type"] == "event"
            assert "profile" not in inner["attributes"]
    assert batch.indexes == [0, 2, 1]


def test_no_request_has_more_than_max_events() -> None:
    plan = plan_event_batches([event(str(i), f"p{i % 7}@x.co") for i in range(2500)])

    assert [len(batch.indexes) for batch in plan.batches] == [1000, 1000, 500]
    assert sorted(i for batch in plan.batches for i in batch.indexes) == list(range(2500))


def test_requests_stay_under_the_byte_limit() -> None:
    max_bytes = 20_000
    plan = plan_event_batches(
        [event(str(i), f"p{i}@x.co", note="x" * (i % 50)) for i in range(400)],
        max_bytes=max_bytes,
    )

    assert len(plan.batches) > 1
    assert all(len(json.dumps(batch.body())) < max_bytes for batch in plan.batches)
    assert sorted(i for batch in plan.batches for i in batch.indexes) == list(range(400))


def test_an_event_too_large_on_its_own_gets_a_request_of_its_own() -> None:
    big = event("big", note="x" * 3000)
    plan = plan_event_batches([event("1"), big, event("2")], max_bytes=2000)

    assert [batch.indexes for batch in plan.batches] == [[0], [1], [2]]


def test_repeated_profile_metric_and_unique_id_is_dropped_and_reported() -> None:
    plan = plan_event_batches(
        [
            event("1", "a@x.co"),
            event("1", "a@x.co"),  # repeat of 0
            event("1", "b@x.co"),  # another profile
            event("1", "a@x.co", metric="View"),  # another metric
            event(None, "a@x.co"),  # no unique_id: Klaviyo keys it by time, never a repeat
            event(None, "a@x.co"),
            event("1", "a@x.co"),  # repeat of 0
        ]
    )

    assert plan.duplicates == {1: 0, 6: 0}
    assert sorted(i for batch in plan.batches for i in batch.indexes) == [0, 2, 3, 4, 5]


def test_a_pointer_names_an_entry_or_one_event_of_it() -> None:
    plan = plan_event_batches([event("1", "a@x.co"), event("2", "b@x.co"), event("3", "a@x.co")])
    (batch,) = plan.batches

    assert batch.calls_at(f"{ROOT}/0/attributes/profile/data/attributes/email") == (0, 2)
    assert batch.calls_at(f"{ROOT}/0/attributes/events/data/1/attributes/time") == (2,)
    assert batch.calls_at(f"{ROOT}/1") == (1,)
    assert batch.calls_at(f"{ROOT}/2") == ()
    assert batch.calls_at(f"{ROOT}/0/attributes/events/data/5") == ()
    assert batch.calls_at("/data") == ()
    assert batch.calls_at(ROOT) == ()


def test_without_drops_calls_and_emptied_entries() -> None:
    plan = plan_event_batches([event("1", "a@x.co"), event("2", "b@x.co"), event("3", "a@x.co")])
    (batch,) = plan.batches

    rest = batch.without({1, 2})

    assert rest is not None
    assert rest.indexes == [0]
    assert len(entries(rest)) == 1
    assert batch.without({0, 1, 2}) is None


def test_profiles_are_split_by_count_and_map_back_by_index_and_payload() -> None:
    bodies = [profile(f"p{i}@x.co") for i in range(5)]

    batches = plan_profile_batches(bodies, max_profiles=2)

    assert [batch.indexes for batch in batches] == [[0, 1], [2, 3], [4]]
    first = batches[0]
    assert first.body()["data"]["type"] == "profile-bulk-import-job"
    assert first.calls_at("/data/attributes/profiles/data/1/attributes/email") == (1,)
    assert first.calls_at("/data/attributes/profiles/data/2") == ()
    assert first.calls_sent_as({"email": "p1@x.co"}) == (1,)
    assert first.calls_sent_as({"type": "profile", "attributes": {"email": "p0@x.co"}}) == (0,)
    assert first.calls_sent_as({"email": "p9@x.co"}) == ()
    assert first.calls_sent_as({}) == ()


def test_profile_payload_match_needs_the_same_identifiers() -> None:
    batch = ProfileBatch(
        (
            (0, {"type": "profile", "attributes": {"email": "a@x.co", "external_id": "1"}}),
            (1, {"type": "profile", "attributes": {"email": "a@x.co", "first_name": "A"}}),
        )
    )

    assert batch.calls_sent_as({"email": "a@x.co", "external_id": "1", "title": "x"}) == (0,)
    assert batch.calls_sent_as({"email": "a@x.co"}) == (1,)
