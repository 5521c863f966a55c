"""Typed simulation events: the schema, the in-model sink and the JSONL writer."""

from vsim.events.kinds import KIND_BY_NAME, KINDS, LEVELS, SCHEMA_VERSION
from vsim.events.sink import EventSink

__all__ = ["KINDS", "KIND_BY_NAME", "LEVELS", "SCHEMA_VERSION", "EventSink"]
