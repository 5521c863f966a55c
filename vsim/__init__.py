"""vsim: a discrete-event simulator of the Linux KVM x86 MMU running many vCPUs.

``vsim.sweep(...)`` runs a parameter sweep and returns its results table; ``vsim.events.load``
reads a run's event log.
"""

from vsim.jit import drop_stale_caches

drop_stale_caches()  # before any compiled function loads its cached object

from vsim.sweeps import sweep  # noqa: E402

__version__ = "0.1.0"
__all__ = ["sweep"]
