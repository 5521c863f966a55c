"""Typed scenario configuration: what a TOML file under ``configs/`` may say.

Every table forbids unknown keys, every number has a range and every enumerated setting lists what is
allowed, so a typo fails before the simulation starts. Mechanisms not built yet (other MMU modes,
PML) are rejected here with a message naming the allowed values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from vsim.costs import CostModel, Duration
from vsim.guest.paging import LOWMEM_PAGES_32
from vsim.units import format_size, parse_size

Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]

PageSize = Literal["4K", "2M", "1G"]
PAGE_LEVEL: dict[str, int] = {"4K": 1, "2M": 2, "1G": 3}
"""``PG_LEVEL_4K/2M/1G`` for each page-size name."""


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class VmConfig(_Table):
    """The VM: vCPUs, the test memory's memslots and how the host backs it."""

    vcpus: int = Field(16, ge=1, le=4096, description="number of vCPUs (each one SimPy process)")
    memslots: int = Field(
        1, ge=1, le=32764, description="memslots the test region is split into evenly (dirty_log_perf_test -x)"
    )
    backing_page_size: PageSize = Field(
        "4K", description="host backing page size; caps the mapping level (host_pfn_mapping_level)"
    )
    base_gpa: Size = Field(4 << 30, description="guest physical address where the test region starts")
    absent_memslots: list[int] = Field(
        default_factory=list,
        description="indices of test-region memslots not created at start (their gfns are MMIO until the VMM "
        "creates them)",
    )


class GuestConfig(_Table):
    """The guest: its paging mode and, under shadow paging, its processes and memory management."""

    page_size: PageSize = Field(
        "4K", description="guest page-table leaf size for the test region (EPT modes; a shadow guest maps 4K)"
    )
    paging: Literal["paging64", "pae", "paging32", "nonpaging"] = Field(
        "paging64",
        description="the guest's paging mode (CR0.PG, CR4.PAE, EFER.LMA); modes other than paging64 need "
        "mmu.mode = shadow",
    )
    processes: int = Field(1, ge=1, le=64, description="shadow paging: guest processes per vCPU, run in turn")
    process_memory: Size = Field(
        0,
        description="shadow paging: memory each process touches (the workload's region); 0 fits the processes "
        "into the vCPU's share of RAM",
    )
    context_switch_interval: Duration = Field(
        0, description="shadow paging: guest time between context switches (a CR3 write); 0: never"
    )
    fork_interval: Duration = Field(
        0,
        description="shadow paging: guest time between forks; the child writes child_writes pages and exits "
        "(0: no forks)",
    )
    child_writes: int = Field(16, ge=0, le=1 << 20, description="pages each forked child writes before it exits")


class WorkloadConfig(_Table):
    """What each vCPU runs: the KVM selftests' memstress loop, or a uniform or Zipf random stream."""

    kind: Literal["memstress", "uniform", "zipf"] = "memstress"
    per_vcpu_memory: Size = Field(64 << 20, description="bytes of test memory per vCPU (memstress -b)")
    overlap: bool = Field(False, description="every vCPU uses the whole region (memstress -o)")
    access: Literal["sequential", "random"] = Field("sequential", description="memstress page order (-a)")
    write_percent: int = Field(100, ge=0, le=100, description="percent of accesses that write (memstress -w)")
    passes: int = Field(1, ge=1, le=1_000_000, description="memstress passes over the region")
    accesses: int = Field(100_000, ge=1, description="accesses per vCPU for the uniform and zipf streams")
    zipf_exponent: float = Field(1.1, gt=0.0, le=10.0, description="Zipf exponent s (page rank r has weight r^-s)")

    @model_validator(mode="after")
    def _whole_pages(self) -> WorkloadConfig:
        if self.per_vcpu_memory < 4096 or self.per_vcpu_memory % 4096:
            raise ValueError("per_vcpu_memory: must be a positive multiple of 4KiB")
        return self


class TlbConfig(_Table):
    """Per-vCPU TLB: separate set-associative arrays for 4K, 2M and 1G translations, LRU per set.

    Defaults follow a Skylake-SP second-level TLB (Intel optimization manual, not a cost anchor):
    1536 4K entries 12-way, 16 1G entries 4-way; 2M gets 1024 entries 8-way. ``ways == entries``
    makes a size class fully associative.
    """

    entries_4k: int = Field(1536, ge=1, le=1 << 20, description="4K entries")
    entries_2m: int = Field(1024, ge=1, le=1 << 20, description="2M entries")
    entries_1g: int = Field(16, ge=1, le=1 << 20, description="1G entries")
    ways_4k: int = Field(12, ge=1, le=4096, description="4K associativity (entries must be a multiple)")
    ways_2m: int = Field(8, ge=1, le=4096, description="2M associativity (entries must be a multiple)")
    ways_1g: int = Field(4, ge=1, le=4096, description="1G associativity (entries must be a multiple)")

    @model_validator(mode="after")
    def _whole_sets(self) -> TlbConfig:
        for size in ("4k", "2m", "1g"):
            entries, ways = getattr(self, f"entries_{size}"), getattr(self, f"ways_{size}")
            if entries % ways:
                raise ValueError(f"entries_{size}: {entries} is not a multiple of ways_{size} = {ways}")
        return self

    @property
    def entries(self) -> tuple[int, int, int]:
        return (self.entries_4k, self.entries_2m, self.entries_1g)

    @property
    def ways(self) -> tuple[int, int, int]:
        return (self.ways_4k, self.ways_2m, self.ways_1g)


class MmuConfig(_Table):
    """Which KVM MMU handles the faults."""

    mode: Literal["tdp_mmu", "legacy_tdp", "shadow"] = Field(
        "tdp_mmu",
        description="tdp_mmu (faults under the read lock), legacy_tdp (the direct MMU of shadow pages, faults "
        "under the write lock) or shadow (EPT off: shadow paging of the guest's page tables)",
    )
    nr_mmu_pages: int = Field(
        0,
        ge=0,
        le=1 << 30,
        description="KVM_SET_NR_MMU_PAGES for the legacy MMU's n_max_mmu_pages: 0 for KVM's default (2% of "
        "the memslot pages, at least 64), else at least 64 (KVM_MIN_ALLOC_MMU_PAGES)",
    )
    stale_root_check: bool = Field(
        True,
        description="is_page_fault_stale refuses an obsolete root (false brings back R3: faults install into "
        "a root a fast zap invalidated)",
    )
    batch_collapse_flushes: bool = Field(
        True,
        description="disabling dirty logging recovers huge pages in place with one flush (6.13+); false: "
        "the TDP MMU zaps each collapsible page table and flushes each time (cost-anchors 3.11)",
    )
    ept_ad: bool = Field(
        True,
        description="kvm_intel.ept_ad: EPT accessed/dirty bits; without them aging makes SPTEs access-tracked "
        "(no RWX: the next access faults and fast_page_fault restores them)",
    )
    age_flush: bool = Field(
        False,
        description="kvm_age_gfn flushes remote TLBs when it cleared an A bit (before 6.13); 6.13+ does not",
    )
    wrprot_flush_on_mmu_writable: bool = Field(
        True,
        description="write-protecting a shadowed guest page table flushes whenever MMU-writable was set "
        "(false brings back R5: the flush is decided by W, missing a dirty-log protection not yet flushed)",
    )


class MemslotsConfig(_Table):
    """How memslot updates publish a new generation (spec §5.3) and how MMIO is cached (§6)."""

    generation_scheme: Literal["in_progress_bit", "double_increment", "single_increment"] = Field(
        "in_progress_bit",
        description="in_progress_bit (today's kernel), double_increment (the 2014 fix) or single_increment "
        "(the bug before it)",
    )
    address_spaces: Literal[1, 2] = Field(1, description="2 with SMM; the generation steps by this")
    mmio_caching: bool = Field(True, description="kvm.mmio_caching: cache MMIO gfns in SPTEs")
    invalid_slot_retry: bool = Field(
        True,
        description="a fault on an INVALID (being deleted or moved) slot retries (false brings back R2: it is "
        "taken for no slot and an MMIO SPTE replaces a present leaf)",
    )
    srcu_expedited: bool = Field(True, description="synchronize_srcu_expedited (else a normal grace period)")
    initial_generation: int = Field(
        0,
        ge=0,
        lt=1 << 62,
        description="generation steps already taken when the VM starts (KVM: 0); just below 2^19 "
        "exercises the MMIO generation wrap",
    )


class MemslotOp(_Table):
    """One ``KVM_SET_USER_MEMORY_REGION`` call by the VMM."""

    at: Duration = Field(description="simulated time the VMM issues the call")
    op: Literal["create", "delete", "move", "flags"] = Field(
        description="KVM_MR_CREATE, KVM_MR_DELETE, KVM_MR_MOVE (to to_gpa) or KVM_MR_FLAGS_ONLY"
    )
    slot: int = Field(ge=0, description="index of the test-region memslot")
    to_gpa: Size | None = Field(None, description="move: the slot's new guest physical address")
    log_dirty: bool = Field(
        True, description="flags: set (true) or clear (false) KVM_MEM_LOG_DIRTY_PAGES; the other flags stay"
    )


class StressConfig(_Table):
    """``memslot_modification_stress_test``: add and delete a one-page dummy slot again and again."""

    iterations: int = Field(0, ge=0, le=100_000, description="create/delete pairs (0: off)")
    start: Duration = Field(0, description="time of the first create")
    interval: Duration = Field(10_000, ge=1, description="from each create to its delete, and on to the next create")


class VmmConfig(_Table):
    """The userspace VMM thread: a timed schedule of memslot updates."""

    ops: list[MemslotOp] = Field(default_factory=list)
    stress: StressConfig = StressConfig()


class DirtyLogConfig(_Table):
    """How KVM logs dirty pages (spec §10): the VM's capabilities and the module parameters."""

    manual_protect: bool = Field(
        True,
        description="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET copies the bitmap, CLEAR re-protects "
        "(dirty_log_perf_test -g turns it off)",
    )
    initially_set: bool = Field(
        True, description="KVM_DIRTY_LOG_INITIALLY_SET (with manual_protect): enabling protects nothing"
    )
    eager_split: bool = Field(True, description="kvm.eager_page_split: split huge pages when protection starts")
    pml: bool = Field(
        False,
        description="Page Modification Logging: SPTEs stay writable, the CPU logs each newly dirtied 4K gpa "
        "to a 512-entry buffer drained at every exit; harvesting clears D instead of W",
    )


class SelftestConfig(_Table):
    """A KVM selftest's host program, run by the VMM thread in place of ``vmm.ops``."""

    name: Literal["none", "dirty_log_perf", "access_tracking_perf", "demand_paging"] = Field(
        "none",
        description="none, dirty_log_perf, access_tracking_perf or demand_paging (cost-anchors §7.2; vCPUs run "
        "the memstress loop)",
    )
    iterations: int = Field(2, ge=2, le=10_000, description="dirty_log_perf_test -i (one memstress pass each)")


class HostMmConfig(_Table):
    """A host-MM thread that invalidates guest memory through the MMU notifiers (spec §1.6)."""

    invalidations: int = Field(0, ge=0, le=10_000_000, description="invalidate_range_start/end pairs (0: off)")
    start: Duration = Field(0, description="time of the first invalidation")
    interval: Duration = Field(100_000, ge=1, description="from one invalidation's start to the next one's")
    pages: int = Field(512, ge=1, le=1 << 30, description="4K pages per invalidation (whole host pages)")
    pattern: Literal["sequential", "random"] = Field(
        "sequential", description="sequential sweeps the test region (NUMA balancing); random picks ranges (KSM)"
    )
    action: Literal["migrate", "dontneed"] = Field(
        "migrate", description="migrate moves the pages to new pfns; dontneed frees them (the next touch zeroes)"
    )
    work: Duration = Field(1000, description="host time between invalidate_range_start returning and _end")
    uffd: bool = Field(False, description="register the test region with userfaultfd (demand_paging_test -u MISSING)")
    uffd_handlers: int = Field(1, ge=1, le=4096, description="uffd handler threads (demand_paging_test -r)")
    uffd_delay: Duration = Field(0, description="each handler's delay per page-in (demand_paging_test -d)")
    pre_lock_retry: bool = Field(
        True,
        description="retry a fault before GUP and before taking mmu_lock if the gfn is being invalidated "
        "(v6.8, R8's fix; false: vCPUs contend on mmu_lock instead)",
    )
    locked_retry_check: bool = Field(
        True, description="mmu_invalidate_retry_gfn under mmu_lock (false brings back R8: stale pfns get mapped)"
    )


class EventsConfig(_Table):
    """How much of the event log to write to events.jsonl."""

    level: Literal["off", "faults", "all"] = "faults"


class SimConfig(_Table):
    """How the simulation executes (not what it models)."""

    mode: Literal["batched", "reference"] = Field(
        "batched", description="batched numpy/numba access stretches, or one SimPy event per access"
    )
    batch_accesses: int = Field(4096, ge=1, le=1 << 24, description="accesses generated and batched per chunk")
    invariants: bool = Field(False, description="run the invariant checker (spec §13); slower")
    fault_kernel: bool = Field(
        True,
        description="batched TDP MMU runs: interleave the vCPUs' accesses and common faults in compiled code "
        "(vsim.vcpu.group); off with the invariant checker or events at 'all'",
    )


class ScenarioConfig(_Table):
    """A whole scenario; ``vsim run`` with no file uses these defaults (= configs/quickstart.toml)."""

    seed: int = Field(1, ge=0, le=2**63 - 1)
    vm: VmConfig = VmConfig()
    guest: GuestConfig = GuestConfig()
    workload: WorkloadConfig = WorkloadConfig()
    tlb: TlbConfig = TlbConfig()
    mmu: MmuConfig = MmuConfig()
    memslots: MemslotsConfig = MemslotsConfig()
    vmm: VmmConfig = VmmConfig()
    dirty_log: DirtyLogConfig = DirtyLogConfig()
    selftest: SelftestConfig = SelftestConfig()
    host_mm: HostMmConfig = HostMmConfig()
    costs: CostModel = CostModel()
    events: EventsConfig = EventsConfig()
    sim: SimConfig = SimConfig()

    @model_validator(mode="after")
    def _region_fits(self) -> ScenarioConfig:
        if self.dirty_log.pml and not self.mmu.ept_ad:
            raise ValueError("dirty_log.pml: PML needs EPT A/D bits (mmu.ept_ad = true), as enable_pml does")
        if 0 < self.mmu.nr_mmu_pages < 64:
            raise ValueError(f"mmu.nr_mmu_pages: {self.mmu.nr_mmu_pages} is below KVM_MIN_ALLOC_MMU_PAGES (64); "
                             "KVM_SET_NR_MMU_PAGES refuses it")  # fmt: skip
        total_pages = self.vm.vcpus * self.workload.per_vcpu_memory // 4096
        if total_pages % self.vm.memslots:
            raise ValueError(f"vm.memslots: {self.vm.memslots} does not divide the {total_pages} test pages evenly")
        if self.vm.base_gpa % (1 << 30):
            raise ValueError("vm.base_gpa: must be 1GiB-aligned so every backing size can map huge")
        if self.vm.base_gpa + total_pages * 4096 > 1 << 52:
            # Name the key the user set (the region is the product of two, placed by a third).
            key = ("workload.per_vcpu_memory" if "per_vcpu_memory" in self.workload.model_fields_set
                   else "vm.vcpus" if "vcpus" in self.vm.model_fields_set else "vm.base_gpa")  # fmt: skip
            raise ValueError(
                f"{key}: vm.vcpus × workload.per_vcpu_memory = {self.vm.vcpus} × "
                f"{format_size(self.workload.per_vcpu_memory)} = {format_size(total_pages * 4096)} from vm.base_gpa "
                f"= {format_size(self.vm.base_gpa)} ends past 4PiB, the 52-bit guest-physical space"
            )
        self._check_schedule(total_pages)
        self._check_selftest()
        self._check_guest(total_pages)
        return self

    def _check_guest(self, total_pages: int) -> None:
        g = self.guest
        shadow = self.mmu.mode == "shadow"
        if not shadow:
            if g.paging != "paging64":
                raise ValueError(f"guest.paging: {g.paging!r} needs mmu.mode = shadow; the EPT modes model a "
                                 "4-level (paging64) guest")  # fmt: skip
            if g.processes != 1 or g.context_switch_interval or g.fork_interval or g.process_memory:
                raise ValueError("guest.processes, process_memory, context_switch_interval and fork_interval: "
                                 "guest processes are modelled under mmu.mode = shadow only")  # fmt: skip
            return
        end = self.vm.base_gpa + total_pages * 4096
        if g.paging == "paging32" and end > 1 << 32:
            raise ValueError(f"guest.paging: paging32 addresses at most 4GiB of physical memory (no PSE-36), but "
                             f"the test region ends at {end:#x}; lower vm.base_gpa or the memory")  # fmt: skip
        if g.paging in ("paging32", "pae", "nonpaging") and end >> 12 > LOWMEM_PAGES_32:
            raise ValueError(f"guest.paging: a 32-bit guest kernel maps its RAM in 896MiB of lowmem, but the "
                             f"test region ends at {end:#x}; lower vm.base_gpa and the memory")  # fmt: skip
        if g.page_size != "4K":
            raise ValueError("guest.page_size: a shadow-paged guest maps its processes' memory with 4K pages")
        if self.dirty_log.pml:
            raise ValueError("dirty_log.pml: PML logs guest-physical addresses of EPT; it needs EPT (not shadow)")
        if not self.mmu.ept_ad:
            raise ValueError("mmu.ept_ad: EPT A/D bits apply to EPT; shadow paging uses the guest's own A/D bits")
        if self.workload.overlap and g.paging != "nonpaging":
            raise ValueError("workload.overlap: under shadow paging each vCPU's processes own their memory")
        if any(op.op != "flags" for op in self.vmm.ops) or self.vm.absent_memslots:
            raise ValueError("vmm.ops: the shadow guest keeps its page tables in the test region; only flags "
                             "updates (dirty logging) may change its memslots")  # fmt: skip
        if g.paging == "nonpaging":
            if g.processes != 1 or g.context_switch_interval or g.fork_interval or g.process_memory:
                raise ValueError("guest.processes: a non-paging guest has no address spaces to switch or fork")
            return
        self._check_guest_memory()

    def _check_guest_memory(self) -> None:
        from vsim.guest.kernel import frames_needed, process_pages, vcpu_share  # (config first)
        from vsim.guest.paging import REGISTERS, shadow_mmu_init_context

        g = self.guest
        mode = shadow_mmu_init_context(*REGISTERS[g.paging])
        if g.process_memory % 4096:
            raise ValueError("guest.process_memory: must be a multiple of 4KiB")
        pages = process_pages(self, mode)
        share = vcpu_share(self, mode)
        need = frames_needed(mode, g.processes, pages, bool(g.fork_interval), g.child_writes)
        if pages < 1 or need > share:
            raise ValueError(f"guest.process_memory: {g.processes} process(es) of {pages} pages need {need} frames "
                             f"with their page tables, but each vCPU's share of RAM is {share}; raise "
                             "workload.per_vcpu_memory or lower the process memory")  # fmt: skip
        if mode.user_base + pages > mode.page_offset:
            raise ValueError("guest.process_memory: the processes' memory runs into the kernel's direct map")

    def _check_selftest(self) -> None:
        st = self.selftest
        if st.name == "none":
            return
        if self.workload.kind != "memstress":
            raise ValueError(f"workload.kind: {st.name} runs the memstress guest loop, not {self.workload.kind!r}")
        if st.name == "demand_paging":
            if self.workload.passes != 1:
                raise ValueError(f"workload.passes: demand_paging makes one pass, not {self.workload.passes}")
        elif st.name == "access_tracking_perf":
            if self.workload.passes != 5:
                raise ValueError("workload.passes: access_tracking_perf runs 5 guest passes (populate, write, read, "
                                 f"write idle, read idle), not {self.workload.passes}")  # fmt: skip
        elif self.workload.passes != st.iterations + 1:
            raise ValueError(
                f"workload.passes: {st.name} needs iterations + 1 = {st.iterations + 1} passes "
                f"(the populate pass, then one per iteration), not {self.workload.passes}"
            )
        if self.vmm.ops or self.vmm.stress.iterations or self.vm.absent_memslots:
            raise ValueError(f"selftest.name: {st.name} drives the memslots itself; drop vmm.ops, vmm.stress and "
                             "vm.absent_memslots")  # fmt: skip

    def _check_schedule(self, total_pages: int) -> None:
        per = total_pages // self.vm.memslots
        base = self.vm.base_gpa >> 12
        where = {i: base + i * per for i in range(self.vm.memslots)}  # slot -> base gfn while it exists
        for i in self.vm.absent_memslots:
            if not 0 <= i < self.vm.memslots:
                raise ValueError(f"vm.absent_memslots: {i} is not a memslot index (0..{self.vm.memslots - 1})")
            where.pop(i, None)
        st = self.vmm.stress
        if st.iterations and any(o.at < st.start + 2 * st.iterations * st.interval for o in self.vmm.ops):
            raise ValueError("vmm.stress: the dummy-slot loop must not overlap vmm.ops in time")
        logging: set[int] = set()
        for n, op in sorted(enumerate(self.vmm.ops), key=lambda e: e[1].at):  # (n names the entry in errors)
            if op.slot >= self.vm.memslots:
                raise ValueError(f"vmm.ops.{n}: slot {op.slot} is not a memslot index (0..{self.vm.memslots - 1})")
            exists = op.slot in where
            if op.op == "create":
                if exists:
                    raise ValueError(f"vmm.ops.{n}: create of slot {op.slot}, which exists then")
                where[op.slot] = base + op.slot * per
                continue
            if not exists:
                raise ValueError(f"vmm.ops.{n}: {op.op} of slot {op.slot}, which does not exist then")
            if op.op == "flags":
                if op.log_dirty == (op.slot in logging):
                    state = "already" if op.log_dirty else "not"
                    raise ValueError(f"vmm.ops.{n}: flags on slot {op.slot}, which is {state} dirty-logging then")
                (logging.add if op.log_dirty else logging.discard)(op.slot)
            elif op.op == "delete":
                logging.discard(op.slot)
                del where[op.slot]
            elif op.op == "move":
                if op.to_gpa is None or op.to_gpa % 4096:
                    raise ValueError(f"vmm.ops.{n}: move of slot {op.slot} needs a 4KiB-aligned to_gpa")
                new = op.to_gpa >> 12
                if new == base - 1 or any(s != op.slot and new < b + per and b < new + per for s, b in where.items()):
                    raise ValueError(f"vmm.ops.{n}: move of slot {op.slot} to {op.to_gpa:#x} overlaps another memslot")
                where[op.slot] = new
