"""Parameter sweeps: a design of points over a scenario, run locally or on a Dask cluster."""

from vsim.sweeps.spec import SweepError, SweepSpec, expand
from vsim.sweeps.sweeper import sweep

__all__ = ["SweepError", "SweepSpec", "expand", "sweep"]
