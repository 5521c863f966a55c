"""Scale: 64 vCPUs x 256 MiB with 4K backing (4M faults) stays under 2 GiB of RSS.

About 11 s here since the vCPU group takes the faults (it was 1.5 minutes and marked slow before).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_64_vcpus_256mib_4k_under_2gib(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--set", "vm.vcpus=64", "--set", "workload.per_vcpu_memory=256MiB", "--set", "events.level=off",
            "--out", str(out), "--quiet"]  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "vsim", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    stats = json.loads((out / "stats.json").read_text())
    timing = json.loads((out / "timing.json").read_text())
    assert stats["vm"]["pages_4k"] == 64 * 65536
    assert stats["vcpu_total"]["pf_fixed"] == 64 * 65536
    assert timing["peak_rss_bytes"] < 2 << 30
