"""Parts: one logical PCollection kept as several, so that it is flattened only where that is cheap.

The identify state's output comes from two fused stages: upserts decided after a shuffle, and the
events with no identify body, which skip it. Beam's local batch runner, FnApiRunner, materializes
every Flatten of PCollections made in different stages: each element is encoded into a buffer and
decoded again by the consumer (`translations.sink_flattens`: "TODO(robertwb): Actually attempt to
sink rather than always materialize"). For the outgoing events that cost about 15 µs each, a
quarter of a batch dry run's CPU. So the stages after the identify state (pre-flight, and each
sink's first per-element step) run on every part, and a sink flattens what it has made small:
JSON lines for the dry run, keyed events for the Klaviyo sink's shuffle (which is a materialization
anyway). Dataflow fuses a Flatten away, so there the parts cost nothing either way.

A part's transforms are labelled like the single PCollection's were, the later parts with a
suffix: `check`, `check_1`; labels stay stable (transforms/sink.py, assembly.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import apache_beam as beam

Parts = tuple[beam.PCollection, ...]


def label(base: str, index: int) -> str:
    """The label of a transform applied to part `index`."""
    return base if index == 0 else f"{base}_{index}"


def as_parts(pcolls: beam.PCollection | Iterable[beam.PCollection]) -> Parts:
    """A PCollection, or several, as parts."""
    if isinstance(pcolls, beam.PCollection):
        return (pcolls,)
    return tuple(pcolls)


def flatten(parts: Parts, name: str) -> beam.PCollection:
    """The parts as one PCollection (no Flatten for a single part)."""
    if len(parts) == 1:
        return parts[0]
    return parts | name >> beam.Flatten()
