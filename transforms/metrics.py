"""The pipeline's Beam counters: one name per outcome, the same names as the stages.

The names live here so that every stage counts under the same namespace and the summary of a
local run (pipeline/run_job.py) can list them in a fixed order.
"""

from __future__ import annotations

import functools
import re

from apache_beam.metrics.metric import Metrics

NAMESPACE = "walkeros_klaviyo"
_REASON_LIMIT = 24  # characters of a reason label kept in a metric name

# (name, label) in the order the summary prints them.
COUNTERS: tuple[tuple[str, str], ...] = (
    ("blank_lines", "blank lines skipped (files)"),
    ("events_in", "events in"),
    ("invalid", "invalid events"),
    ("ignored", "ignored by a rule"),
    ("consent", "consent not granted"),
    ("no_identifier", "no identifier"),
    ("plan_warnings", "values coerced away (warnings)"),
    ("events_planned", "events planned"),
    ("identify_only", "identify only (a profile, no event)"),
    ("nothing_to_send", "nothing to send (a silent rule without identify)"),
    ("profiles_planned", "profile upserts planned"),
    ("profiles_unchanged", "profile upserts skipped: unchanged"),
    ("profiles_out_of_order", "profile upserts skipped: older than newest"),
    ("profiles_out_of_range", "profile upserts of events outside Klaviyo's time range"),
    ("dry_run_calls", "calls written (dry run)"),
    ("events_delivered", "events delivered to Klaviyo"),
    ("profiles_delivered", "profile upserts delivered to Klaviyo"),
    ("profiles_superseded", "profile upserts not sent: a newer one of the profile went"),
    ("profiles_older_than_delivered", "profile upserts not sent: older than one delivered"),
    ("profiles_repaired", "unchanged upserts sent again after a dead letter"),
)


@functools.cache
def counter(name: str) -> Metrics.DelegatingCounter:
    """A counter of this pipeline, created once per name and process.

    A Beam counter object holds only its name: `inc` finds the metrics container of the bundle
    running on the calling thread, so one object serves every DoFn, bundle and thread. Creating
    it per element (`Metrics.counter` builds a MetricName and validates it) cost about 4 µs
    per call, several calls per event."""
    return Metrics.counter(NAMESPACE, name)


def dead_letter_counter_name(stage: str) -> str:
    """`dead_letters_<stage>`: the metric name of the dead letters a stage produced."""
    return f"dead_letters_{stage}"


def dead_letter_reason_counter_name(stage: str, label: str) -> str:
    """`dead_letters_<stage>_<label>`: a stage's dead letters by a short reason label.

    Labels are meant to come from a small set (for the sink: an HTTP status or one of the few
    causes errors.py names, such as `timeout` or `invalid_request`), never from free text. They
    are still folded to `[a-z0-9_]` and clipped, so an odd one cannot make an odd metric name.
    """
    folded = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:_REASON_LIMIT]
    return f"{dead_letter_counter_name(stage)}_{folded or 'other'}"
