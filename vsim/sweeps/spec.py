"""What a sweep varies: its design (grid, zip, replicates) and the points it expands into.

A ``[sweep]`` table in a scenario file, or the ``--grid``/``--zip``/``--replicates`` options, say
which dotted config keys (the same keys as ``--set``) take which values:

* ``grid``: the Cartesian product of every factor's levels;
* ``zip``: lists of equal length stepped in lock-step (crossed with the grid);
* ``replicates = N``: each design point N times with independent seeds, spawned from the
  scenario's seed with ``numpy.random.SeedSequence(seed).spawn``. With
  ``common_random_numbers = true``, replicate *r* uses the same seed at every design point.

Every point's config is validated before anything runs, so a bad factor key or level fails at
once with the usual one-line error. A point's id is a hash of its resolved config: the same
point always gets the same id and directory.
"""

from __future__ import annotations

import hashlib
import itertools
import tomllib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vsim.config import ConfigError, ScenarioConfig, dump_config, load_config
from vsim.units import parse_duration

DEFAULT_METRICS = (
    "sim_time_ns",
    "vcpu_total.pf_taken",
    "vcpu_total.pf_fixed",
    "vcpu_total.pf_retry",
    "latency_ns.fault_service.p50",
    "latency_ns.fault_service.p99",
    "latency_ns.mmu_lock_wait.read.p99",
    "vm.mmu_lock_contended",
)
SWEEP_KEYS = {"grid", "zip", "replicates", "common_random_numbers", "metrics", "timeout"}


class SweepError(ConfigError):
    """A bad sweep design; ``str()`` is one line naming the key."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its factor levels, replicate number, seed and validated config."""

    factors: dict[str, Any]
    replicate: int
    seed: int
    config: ScenarioConfig
    id: str


@dataclass
class SweepSpec:
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: dict[str, list[Any]] = field(default_factory=dict)
    replicates: int = 1
    common_random_numbers: bool = False
    metrics: tuple[str, ...] = DEFAULT_METRICS
    timeout_ns: int | None = None

    @property
    def factors(self) -> list[str]:
        return [*self.grid, *self.zip]

    @classmethod
    def from_table(cls, table: dict[str, Any], source: str) -> SweepSpec:
        unknown = sorted(set(table) - SWEEP_KEYS)
        if unknown:
            raise SweepError(f"{source}: sweep.{unknown[0]}: unknown key; allowed: {', '.join(sorted(SWEEP_KEYS))}")
        spec = cls()
        for name in ("grid", "zip"):
            levels = table.get(name, {})
            if not isinstance(levels, dict):
                raise SweepError(f"{source}: sweep.{name}: expected a table of key = [levels]")
            for key, vals in levels.items():
                if not isinstance(vals, list) or not vals:
                    raise SweepError(f'{source}: sweep.{name}."{key}": expected a non-empty list of levels')
            getattr(spec, name).update(levels)
        if len({len(v) for v in spec.zip.values()}) > 1:
            raise SweepError(f"{source}: sweep.zip: every list must have the same length")
        reps = table.get("replicates", 1)
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise SweepError(f"{source}: sweep.replicates: must be a positive integer (got {reps!r})")
        spec.replicates = reps
        crn = table.get("common_random_numbers", False)
        if not isinstance(crn, bool):
            raise SweepError(f"{source}: sweep.common_random_numbers: must be true or false")
        spec.common_random_numbers = crn
        if "metrics" in table:
            m = table["metrics"]
            if not isinstance(m, list) or not m or not all(isinstance(x, str) for x in m):
                raise SweepError(f"{source}: sweep.metrics: expected a list of stats.json keys")
            spec.metrics = tuple(m)
        if "timeout" in table:
            try:
                spec.timeout_ns = parse_duration(table["timeout"])
            except ValueError as e:
                raise SweepError(f"{source}: sweep.timeout: {e}") from None
        return spec

    def add_option(self, kind: str, item: str) -> None:
        """``--grid key=v1,v2,...`` or ``--zip key=v1,v2,...``."""
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SweepError(f"--{kind} {item}: expected dotted.key=v1,v2,...")
        levels = [_level(v) for v in values.split(",")]
        getattr(self, kind)[key.strip()] = levels
        if kind == "zip" and len({len(v) for v in self.zip.values()}) > 1:
            raise SweepError(f"--zip {item}: every zipped list must have the same length")


def _level(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, str):
        return f'{key}="{value}"'
    return f"{key}={value}"


def expand(path: str | None, sets: list[str], spec: SweepSpec) -> list[Point]:
    """Every point of the design, in design order, each validated."""
    base = load_config(path, sets)
    grid_keys = list(spec.grid)
    combos = list(itertools.product(*spec.grid.values())) if grid_keys else [()]
    zipped = list(zip(*spec.zip.values(), strict=True)) if spec.zip else [()]
    designs = [dict(zip(grid_keys, g, strict=True)) | dict(zip(spec.zip, z, strict=True))
               for g in combos for z in zipped]  # fmt: skip
    root = np.random.SeedSequence(base.seed)
    n = len(designs)
    if spec.common_random_numbers:
        seeds = [_seed(s) for s in root.spawn(spec.replicates)]
    else:
        seeds = [_seed(s) for s in root.spawn(n * spec.replicates)]
    points = []
    for i, factors in enumerate(designs):
        overrides = [_override(k, v) for k, v in factors.items()]
        for r in range(spec.replicates):
            seed = seeds[r] if spec.common_random_numbers else seeds[i * spec.replicates + r]
            try:
                cfg = load_config(path, [*sets, *overrides, f"seed={seed}"])
            except ConfigError as e:
                where = ", ".join(f"{k}={v!r}" for k, v in factors.items())
                msg = str(e).removeprefix("--set: ")
                raise SweepError(f"sweep point ({where}): {msg}") from None
            pid = hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:12]
            points.append(Point(factors, r, seed, cfg, pid))
    return points


def _seed(seq: np.random.SeedSequence) -> int:
    return int(seq.generate_state(1, np.uint64)[0] & np.uint64(2**63 - 1))
