"""Typed simulation events: the schema, the in-model sink and the JSONL writer."""

from vsim.events.kinds import KIND_BY_NAME, KINDS, LEVELS, SCHEMA_VERSION
from vsim.events.sink import NULL_SINK, EventSink

__all__ = ["KINDS", "KIND_BY_NAME", "LEVELS", "NULL_SINK", "SCHEMA_VERSION", "EventSink"]
