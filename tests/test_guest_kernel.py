"""The guest kernel over shadow paging: frames, the direct map, fork and exit."""

from __future__ import annotations

from conftest import simulate

from vsim.guest.memory import FramePool
from vsim.guest.paging import gpte_to_gfn


def test_frame_pool_is_last_in_first_out() -> None:
    pool = FramePool(100, 4)
    assert [pool.alloc(), pool.alloc()] == [100, 101]
    pool.free(100)
    assert pool.alloc() == 100 and pool.available == 2


def test_processes_share_the_kernel_half_and_fork_leaves_no_frames_behind() -> None:
    vm, st, _ = simulate("mmu.mode=shadow", "vm.vcpus=1", "workload.per_vcpu_memory=8MiB", "guest.processes=2",
                         "guest.process_memory=1MiB", "guest.fork_interval=50us", "guest.child_writes=8",
                         "guest.context_switch_interval=30us")  # fmt: skip
    g = vm.guest
    assert g is not None
    a, b = g.processes[0]
    kernel_slot = g.mode.index(g.kva(vm.region_base_gfn), 4)
    assert a.pgd != b.pgd and g.mem.read(a.pgd, kernel_slot) == g.mem.read(b.pgd, kernel_slot) != 0
    assert st["vcpu_total"]["guest_forks"] > 0
    # Every frame a child took (page tables, copies) went back to the pool: the two processes'
    # pages and tables are all that is allocated.
    used = g.pools[0].npages - g.pools[0].available
    mapped = int((a.frames >= 0).sum() + (b.frames >= 0).sum())

    def tables(gfn: int, level: int) -> int:
        if level == 1:
            return 1
        entries = [i for i in g.mem.present(gfn) if level < 4 or i != kernel_slot]
        return 1 + sum(tables(gpte_to_gfn(g.mem.read(gfn, i), level, g.mode), level - 1) for i in entries)

    assert mapped > 0 and used == mapped + tables(a.pgd, 4) + tables(b.pgd, 4)
