"""userfaultfd demand paging, as ``demand_paging_test`` uses it (cost-anchors §7.2, rows 2.10–2.11).

The test region is registered with a userfaultfd (``UFFDIO_REGISTER_MODE_MISSING``). The first
touch of a missing host page does not allocate in the kernel: ``get_user_pages`` in
``kvm_faultin_pfn`` blocks on the uffd wait queue until a userspace handler thread reads the event,
waits its configured delay (``-d``, a network fetch), and resolves it with ``UFFDIO_COPY``. Handler
threads serve page-ins one at a time in arrival order; the faulting vCPU waits for its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vsim.vm import Vm


class Userfaultfd:
    """The uffd and its handler threads (``-r``): when each handler is next free."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.free_at = [0] * vm.cfg.host_mm.uffd_handlers
        self.page_ins = 0
        self.wait_ns = 0  # summed time vCPUs waited for a handler to pick their fault up

    def page_in(self, t: int) -> int:
        """A missing page faulted at ``t``: returns when ``UFFDIO_COPY`` has filled it."""
        c = self.vm.costs
        k = min(range(len(self.free_at)), key=self.free_at.__getitem__)  # the first handler free
        start = max(t, self.free_at[k])
        done = start + self.vm.cfg.host_mm.uffd_delay + c.uffd_page_in
        self.free_at[k] = done
        self.page_ins += 1
        self.wait_ns += start - t
        return done
