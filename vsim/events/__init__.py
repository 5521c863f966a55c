"""Typed simulation events: the schema, the in-model sink and the JSONL writer."""

from vsim.events.kinds import KIND_BY_NAME, KINDS, LEVELS, SCHEMA_VERSION
from vsim.events.reader import EventLogError, Selection, iter_events, load
from vsim.events.sink import EventSink

__all__ = [
    "KINDS",
    "KIND_BY_NAME",
    "LEVELS",
    "SCHEMA_VERSION",
    "EventLogError",
    "EventSink",
    "Selection",
    "iter_events",
    "load",
]
