"""Sizes in bytes and durations in integer nanoseconds, parsed from and printed to config strings.

Sizes use binary units (``64MiB``, ``2GiB``); durations use ``ns``, ``us``/``µs``, ``ms`` and ``s``
(``2.5us``, ``40ms``). Everything inside vsim is an ``int``: a duration that is not a whole number
of nanoseconds is rejected rather than rounded, so a config always means exactly one run.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}

_NUM_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-zµ]+)\s*$")


def _parse(value: object, units: dict[str, int], what: str) -> int:
    allowed = ", ".join(units)
    if isinstance(value, bool):
        raise ValueError(f"expected a {what} such as '{_example(units)}', got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must not be negative (got {value})")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a {what} string with a unit ({allowed}), got {type(value).__name__}")
    m = _NUM_UNIT.match(value)
    if not m or m.group(2) not in units:
        raise ValueError(f"'{value}' is not a {what}; write a number with one of the units {allowed}")
    try:
        exact = Decimal(m.group(1)) * units[m.group(2)]
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"'{value}' is not a {what}") from e
    if exact != exact.to_integral_value():
        base = "byte" if units is SIZE_UNITS else "nanosecond"
        raise ValueError(f"'{value}' is not a whole number of {base}s")
    return int(exact)


def _example(units: dict[str, int]) -> str:
    return "64MiB" if units is SIZE_UNITS else "2.5us"


def parse_size(value: object) -> int:
    """Bytes from ``64MiB``-style strings (or a plain non-negative int of bytes)."""
    return _parse(value, SIZE_UNITS, "size")


def parse_duration(value: object) -> int:
    """Integer nanoseconds from ``2.5us``-style strings (or a plain non-negative int of ns)."""
    return _parse(value, DURATION_UNITS, "duration")


# Bounds that keep the simulation's integer-nanosecond arithmetic far inside int64 (compiled code
# cannot detect an overflow): a config's times and intervals, and each step's cost.
MAX_CONFIG_DURATION_NS = 10**15  # about 11.6 days of simulated time
MAX_COST_NS = 10**9  # one second per timed step


def parse_config_duration(value: object) -> int:
    """A config's time or interval: ``parse_duration``, at most ``MAX_CONFIG_DURATION_NS``."""
    return _bounded(parse_duration(value), MAX_CONFIG_DURATION_NS, "a time or interval", "1000000s")


def parse_cost(value: object) -> int:
    """One timed step's cost: ``parse_duration``, at most ``MAX_COST_NS``."""
    return _bounded(parse_duration(value), MAX_COST_NS, "a cost", "1s")


def _bounded(ns: int, limit: int, what: str, text: str) -> int:
    if ns > limit:
        raise ValueError(f"{what} must be at most {text} (got {format_duration(ns)})")
    return ns


def format_size(nbytes: int) -> str:
    """The largest binary unit that represents ``nbytes`` exactly."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if nbytes and nbytes % SIZE_UNITS[unit] == 0:
            return f"{nbytes // SIZE_UNITS[unit]}{unit}"
    return f"{nbytes}B"


def format_duration(ns: int) -> str:
    """The largest unit that represents ``ns`` exactly (``1200ns``, ``40ms``)."""
    for unit in ("s", "ms", "us"):
        if ns and ns % DURATION_UNITS[unit] == 0:
            return f"{ns // DURATION_UNITS[unit]}{unit}"
    return f"{ns}ns"
