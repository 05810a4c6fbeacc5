"""Pure rules of the sink and the identify state, without Beam: flush planning (newest wins,
hints, upserts before events, one meaning of null), the profile memory, the ordering time, and the
sink element's explicit encoding."""

from __future__ import annotations

from transforms.elements import (
    Envelope,
    OutgoingEvent,
    PlannedEvent,
    decode_outgoing,
    decode_planned,
    dumps,
    encode_outgoing,
    encode_planned,
)
from transforms.klaviyo.flush import (
    OLDER,
    SUPERSEDED,
    UNCHANGED,
    ProfileMemory,
    Upsert,
    has_null,
    past_retry_deadline,
    plan_upserts,
    ready_events,
    split_for_import,
)
from transforms.klaviyo.identify_state import (
    IdentifyState,
    Verdict,
    decide,
    ordering_time,
    sink_order,
)
from transforms.klaviyo.plan import Call, EventPlan
from transforms.klaviyo.wire import CREATE_EVENT, CREATE_OR_UPDATE_PROFILE

T = 1_764_000_000_000.0  # 2025-11-24, in ms
SKEW = 300_000.0


def test_the_newest_upsert_of_each_profile_is_the_one_sent() -> None:
    upserts = [Upsert("a", T + 2, True), Upsert("a", T + 9, True), Upsert("b", T, True),
               Upsert("a", T + 5, True)]
    plan = plan_upserts(upserts, ProfileMemory(), busy=set())
    assert sorted(plan.send) == [1, 2]
    assert plan.settle == {0: SUPERSEDED, 3: SUPERSEDED} and plan.wait == []


def test_an_upsert_older_than_one_klaviyo_accepted_is_never_sent() -> None:
    memory = ProfileMemory()
    memory.accepted("a", T + 10, now_s=0)
    plan = plan_upserts([Upsert("a", T + 5, True), Upsert("b", T + 5, True)], memory, set())
    assert plan.send == [1] and plan.settle == {0: OLDER}


def test_hints_are_sent_only_for_a_profile_whose_newest_upsert_was_dead_lettered() -> None:
    memory = ProfileMemory()
    memory.accepted("held", T, now_s=0)
    memory.dead_lettered("lost", T, now_s=0)
    hints = [Upsert("held", T + 1, False), Upsert("lost", T + 1, False), Upsert("new", T, False)]
    plan = plan_upserts(hints, memory, set())
    assert plan.send == [1] and plan.settle == {0: UNCHANGED, 2: UNCHANGED}
    # once Klaviyo accepts a body at least as new, the profile needs no repair any more
    memory.accepted("lost", T + 1, now_s=1)
    assert plan_upserts(hints, memory, set()).send == []


def test_a_changed_upsert_wins_over_a_hint_and_a_running_job_holds_its_profile() -> None:
    memory = ProfileMemory()
    memory.dead_lettered("a", T, now_s=0)
    upserts = [Upsert("a", T + 3, False), Upsert("a", T + 1, True), Upsert("b", T, True)]
    plan = plan_upserts(upserts, memory, busy={"b"})
    assert plan.send == [1] and plan.settle == {0: SUPERSEDED} and plan.wait == [2]


def test_a_dead_letter_older_than_what_klaviyo_holds_needs_no_repair() -> None:
    memory = ProfileMemory()
    memory.accepted("a", T + 5, now_s=0)
    memory.dead_lettered("a", T + 1, now_s=0)
    assert not memory.failed("a")


def test_the_memory_is_compact_and_forgets_by_age() -> None:
    memory = ProfileMemory()
    memory.accepted("ä@x.org", T, now_s=100)
    memory.dead_lettered("b", T + 1, now_s=100)
    memory.accepted("old", T, now_s=0)
    encoded = memory.encode()
    assert len(encoded) < 3 * 40  # three doubles and the key per profile
    decoded = ProfileMemory.decode(encoded)
    assert decoded.accepted_ms("ä@x.org") == T and decoded.failed("b")
    assert decoded.accepted_ms("b") is None
    decoded.prune(150, accepted_horizon_s=60, failed_horizon_s=3600)
    assert len(decoded) == 2 and decoded.accepted_ms("old") is None
    decoded.prune(100 + 3601, accepted_horizon_s=60, failed_horizon_s=3600)
    assert len(decoded) == 0
    assert len(ProfileMemory.decode(None)) == 0


def test_the_memory_keeps_a_profile_key_longer_than_64_kib() -> None:
    # Pre-flight lets a 70,000-byte external id through (strings up to 100 KiB): the memory
    # the sink stores after sending it must encode, or the key's flush fails for ever.
    long = "é" * 35_000
    memory = ProfileMemory()
    memory.dead_lettered(long, T, now_s=0)
    memory.accepted("short", T, now_s=0)
    decoded = ProfileMemory.decode(memory.encode())
    assert decoded.failed(long) and decoded.accepted_ms("short") == T
    decoded.accepted(long, T + 1, now_s=1)
    assert ProfileMemory.decode(decoded.encode()).accepted_ms(long) == T + 1


def test_events_wait_for_every_unsettled_upsert_of_their_profile() -> None:
    assert ready_events(["a", None, "b", "a"], unsettled={"a"}) == [1, 2]


def test_only_bodies_without_null_go_as_a_bulk_import() -> None:
    with_null = {"data": {"attributes": {"email": "a@x.org", "properties": {"tier": None}}}}
    without = {"data": {"attributes": {"email": "b@x.org", "location": {"city": "Rome"}}}}
    assert has_null(with_null) and not has_null(without) and has_null([1, [None]])
    assert split_for_import([without, with_null, without], threshold=1) == ([0, 2], [1])
    assert split_for_import([without, with_null], threshold=1) == ([], [0, 1])
    assert split_for_import([with_null] * 500, threshold=100) == ([], list(range(500)))


def test_the_retry_deadline_counts_from_the_first_attempt() -> None:
    assert not past_retry_deadline(100.0, 219.9, 120)
    assert past_retry_deadline(100.0, 220.0, 120)


def test_ordering_time_never_runs_ahead_of_the_reference_by_more_than_the_skew() -> None:
    assert ordering_time(T - 5_000, T, SKEW) == T - 5_000
    assert ordering_time(T + 10_000, T, SKEW) == T + 10_000
    assert ordering_time(T + 3_600_000, T, SKEW) == T + SKEW  # a clock an hour ahead
    assert ordering_time(T * 1000, T, SKEW) is None  # microseconds: years ahead
    assert ordering_time(900_000_000_000, T, SKEW) is None  # 1998: Klaviyo refuses it
    # out of range: ranked below every trustworthy time, so a real upsert always wins
    assert sink_order(T * 1000, T, SKEW) < 946_684_800_000 and sink_order(-5, T, SKEW) == -5


def test_an_event_out_of_range_never_moves_the_newest_time() -> None:
    body_a, body_b = {"n": "a"}, {"n": "b"}
    state, verdict = decide(None, body_a, T, timestamp_ms=T)
    assert verdict is Verdict.CHANGED
    future, verdict = decide(state, body_b, None, timestamp_ms=T * 1000)
    assert verdict is Verdict.OUT_OF_RANGE and future.newest_ms == T
    later, verdict = decide(future, {"n": "c"}, T + 1, timestamp_ms=T + 1)
    assert verdict is Verdict.CHANGED  # a real change after it is not "out of order"
    assert decide(later, body_a, None, timestamp_ms=9e11)[1] is Verdict.OLDER  # 1998
    assert decide(IdentifyState(), body_a, None, timestamp_ms=9e11)[1] is Verdict.OUT_OF_RANGE


def test_the_sink_element_round_trips_through_its_encoding() -> None:
    profile = Call(CREATE_OR_UPDATE_PROFILE, {"data": {"attributes": {"email": "a@x.org",
                                                                       "first_name": "\udc80"}}})
    event = Call(CREATE_EVENT, {"data": {"attributes": {"value": 1.0, "n": 2**70}}}, ("p",))
    outgoing = OutgoingEvent(Envelope(b"\xff raw", {"k": "v"}, "m-1", 1.5, "user-7"),
                             {"id": [1]}, "a", T, profile, True, event)
    assert decode_outgoing(encode_outgoing(outgoing)) == outgoing
    plain = OutgoingEvent(Envelope(b"{}"), "e", None, 0.0)
    assert decode_outgoing(encode_outgoing(plain)) == plain


def test_a_sink_element_stored_before_the_ordering_key_was_kept_still_decodes() -> None:
    """A job updated in place (`--update`) finds elements in its sink state, and in flight
    through its shuffle, that an earlier version encoded without the Pub/Sub ordering key."""
    old_row = [{"k": "v"}, "m-1", 1.5, "e-1", "a", T, None, False, [0, {"n": 1}, []]]
    old = len(dumps(old_row)).to_bytes(4, "big") + dumps(old_row) + b"{}"
    assert decode_outgoing(old) == OutgoingEvent(Envelope(b"{}", {"k": "v"}, "m-1", 1.5),
                                                 "e-1", "a", T, None, False,
                                                 Call(CREATE_EVENT, {"n": 1}))
    old_planned = [{}, None, None, "e-1", None, None, T, None, None, []]
    old = len(dumps(old_planned)).to_bytes(4, "big") + dumps(old_planned) + b"{}"
    assert decode_planned(old) == PlannedEvent(Envelope(b"{}"),
                                               EventPlan("e-1", None, None, T, None, None, []))


def test_the_identify_states_input_round_trips_through_its_encoding() -> None:
    plan = EventPlan("e-1", None, "a@x.org", T, Call(CREATE_OR_UPDATE_PROFILE, {"n": 1.5}),
                     Call(CREATE_EVENT, {"s": "\udc80"}, ("too old",)), ["value dropped"])
    planned = PlannedEvent(Envelope(b"\x00bytes", {"src": "web"}, None, None, "user-7"), plan)
    assert decode_planned(encode_planned(planned)) == planned
