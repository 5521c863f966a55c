"""Loading a scenario: TOML file, ``--set`` overrides, validation, and one-line errors.

Errors name the dotted key, the file and line where the key is written, and what is allowed, so the
CLI can print exactly one line and exit 2.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from vsim.config.schema import ScenarioConfig

MAX_CONFIG_BYTES = 1 << 20  # a scenario file is a few KiB; anything past this is not one


class ConfigError(Exception):
    """A bad config file, key or value; ``str()`` is the one line to print."""


def read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    """The parsed TOML of a scenario file and its text."""
    source = str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device (/dev/zero) never end
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError(f"{source}: cannot read config file ({kind})")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{source}: {st.st_size} bytes is too large for a config file "
                              f"(at most {MAX_CONFIG_BYTES // 2**20} MiB)")  # fmt: skip
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: cannot read config file (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except OSError as e:  # permission, a path through a file, a name too long, ...
        raise ConfigError(f"{source}: cannot read config file ({e.strerror or e.__class__.__name__})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ScenarioConfig:
    """Read ``path`` (or the built-in default), apply ``key=value`` overrides and validate.

    A ``[sweep]`` table, if the file has one, describes a sweep over this scenario (``vsim sweep``)
    and is not part of the scenario itself.
    """
    raw: dict[str, Any] = {}
    text = ""
    source = "<default>"
    if path is not None:
        source = str(path)
        raw, text = read_toml(path)
        raw.pop("sweep", None)
    set_keys: set[str] = set()
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value, item)
        set_keys.add(key)
    try:
        return ScenarioConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source, text, set_keys)) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected dotted.key=value")
    key, _, value = item.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"--set {item}: '{key}' is not a dotted key such as vm.vcpus")
    value = value.strip()
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value  # a bare word: a string such as tdp_mmu or 64MiB


def _set_dotted(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: '{part}' is a value, not a table")
        node = child
    node[parts[-1]] = value


def _one_line(err: ValidationError, source: str, text: str, set_keys: set[str]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # Model-level checks put the key at the start of the message.
    m = re.match(r"([a-z_]+(?:\.[a-z_0-9]+)*): (.*)", msg)
    if m and not loc:
        loc, msg = m.group(1).split("."), m.group(2)
    elif m and loc and not loc[-1].startswith(m.group(1).split(".")[0]):
        loc, msg = loc + m.group(1).split("."), m.group(2)
    elif m:
        msg = m.group(2)
    key = ".".join(loc) if loc else "(top level)"
    if first["type"] == "extra_forbidden":
        msg = f"unknown key; allowed here: {', '.join(_allowed_keys(loc[:-1]))}"
    elif first["type"] == "literal_error":
        msg = f"must be one of {first['ctx']['expected']} (got {first['input']!r})"
    elif "input" in first and first["type"] not in ("value_error", "missing") and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    where = _where(source, text, loc, set_keys)
    return f"{where}: {key}: {msg}"


def _allowed_keys(table: list[str]) -> list[str]:
    model: Any = ScenarioConfig
    for part in table:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _where(source: str, text: str, loc: list[str], set_keys: set[str]) -> str:
    dotted = ".".join(loc)
    if any(dotted == k or dotted.startswith(k + ".") for k in set_keys):
        return "--set"
    line = _find_line(text, loc) if text else None
    return f"{source}:{line}" if line else source


def _find_line(text: str, loc: list[str]) -> int | None:
    """The line that writes ``loc``: a ``key =`` under its ``[table]``, or the table header itself."""
    table: list[str] = []
    header_line = None
    entries: dict[tuple[str, ...], int] = {}  # [[array.of.tables]] seen so far, by path
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        am = re.match(r"^\[\[([^\[\]]+)\]\]", s)
        hm = None if am else re.match(r"^\[([^\[\]]+)\]", s)
        if am or hm:
            path = [p.strip().strip('"') for p in (am or hm).group(1).split(".")]  # type: ignore[union-attr]
            if am:  # an entry of an array of tables: its index is part of the key (vmm.ops.1.op)
                k = entries.get(tuple(path), -1) + 1
                entries[tuple(path)] = k
                path.append(str(k))
            table = path
            if table == loc[: len(table)] and header_line is None:
                header_line = n
            continue
        km = re.match(r"^([A-Za-z0-9_.\"-]+)\s*=", s)
        if km:
            full = table + [p.strip().strip('"') for p in km.group(1).split(".")]
            if full == loc or full == loc[: len(full)]:
                return n
    return header_line


def dump_config(cfg: ScenarioConfig) -> str:
    """The resolved config as TOML with every default filled in; loading it gives ``cfg`` back."""
    data = cfg.model_dump(mode="json", exclude_none=True)  # an unset optional key is left out
    return tomli_w.dumps(data)
