"""The state of a vCPU group in arrays: the columns of its tables and the codes its loop uses.

``vsim.vcpu.group_kernel`` runs the loop over these arrays; ``vsim.vcpu.group`` copies state between
them and the model's Python objects. ``ms`` has a row per vCPU (``M_*`` columns, the member's
next action ``PH_*`` and why it left ``LEAVE_*``), ``ss`` the members' stat deltas (``S_*``), ``g``
the VM-wide scalars (``G_*``), ``c`` the costs (``C_*``). ``GS_*`` say why the loop returned.
"""

from __future__ import annotations

from vsim.requests import KVM_REQ_TLB_FLUSH, KVM_REQ_TLB_FLUSH_CURRENT

NEVER = 1 << 62

# Columns of the member table ``ms`` (one row per vCPU).
M_NOW, M_PRIO, M_PHASE, M_I, M_N, M_SYNCED, M_ROOT, M_FLAGS = 0, 1, 2, 3, 4, 5, 6, 7
M_GFN, M_WRITE, M_T_EXIT, M_TOKEN, M_TOKEN_T, M_SRCU_REG, M_PFN, M_MMU_SEQ = 8, 9, 10, 11, 12, 13, 14, 15
M_TABLE, M_IDX, M_LEVEL, M_OLD, M_TABLE_GEN, M_RET, M_EXIT_SEQ, M_FAULT_SEQ = 16, 17, 18, 19, 20, 21, 22, 23
M_MODE, M_LEAVE, M_REQ, M_KICK, M_NIPI, M_IPI_TAKEN, M_IN_FAULT, M_PASS_END, M_AFTER, M_KEYP = range(24, 34)
M_GUEST_EV, M_WBASE = 34, 35
M_COLS = 36
# M_KEYP is the priority of the member's next action: its own (M_PRIO), or GRANT_PRIO where a hand-over
# of mmu_lock resumes it (as the waiter's event fires at GRANT_PRIO in Python). M_GUEST_EV is the
# guest kernel's next scheduled action (``Vcpu.guest_event_at``: shadow paging's context switches and
# forks), where the member leaves; M_WBASE the key of ``wmaps[m]``'s first entry (``Vcpu.wbase``).

# Member phases: where its next action is (PH_OUT: not a member).
PH_OUT, PH_RUN, PH_LOCK, PH_INSTALL, PH_ENTRY, PH_DONE, PH_LEFT, PH_IRQ, PH_NEXT = range(9)
PH_LOCKWAIT, PH_LOCKED, PH_UNLOCK = 9, 10, 11
# The legacy MMU's fault under the write lock: PH_LOCKWAIT, queued for mmu_lock (no key until a
# hand-over); PH_LOCKED, holding it, the locked section due; PH_UNLOCK, write_unlock due.
# PH_LEFT: left, not yet resumed. PH_IRQ: an IPI arrived in guest mode, to be taken. PH_DONE: the
# chunk's accesses are done (a GUEST_SYNC follows at a pass end). PH_NEXT: the next chunk is due.
# M_FLAGS bits, set by the driver from the vCPU's Python state.
F_LEAVE = 1  # requests other than TLB flushes, a second IPI, or PML: leave at the next access or entry
F_ROOT_INVALID = 2  # the root is obsolete (is_page_fault_stale)
# Why a member left (M_LEAVE).
LEAVE_RUN, LEAVE_PYFAULT, LEAVE_LOCK, LEAVE_ENTRY, LEAVE_LOCKED = 1, 2, 3, 4, 5
# LEAVE_LOCKED: holding mmu_lock for write, with a locked section the loop cannot finish (eviction, a
# huge or changed SPTE on the path): Python goes on from there (``LegacyMmu.page_fault_held``).

# Columns of the per-member stat deltas ``ss``.
(S_EXITS, S_PF_TAKEN, S_PF_FIXED, S_PF_SPURIOUS, S_PF_RETRY, S_HOST_ALLOCS, S_IRQ_EXITS, S_TLB_FLUSH,
 S_IO_EXITS, S_PF_FAST) = range(10)  # fmt: skip
S_COLS = 10

# The VM-wide scalars ``g`` (G_PAGES_4K + level - 1 counts the leaves of each level).
# (The page-table pool, the page stats, the refault record and mmu_lock are not here: the loop
# works on the MMU's own arrays, ``vsim.mmu.sp_pool.Pool``, and the lock's, ``MmuLock.lk``/``q``.)
# G_NLW counts the rows of ``lwbuf``: lock waits (write, actor, ns) for ``MmuLock.note_wait``.
(G_STOP, G_STOP_M, G_EXT_T, G_EXT_P, G_HZ, G_EXT_WAITING, G_SRCU_NEXT, G_SRCU_WAITS, G_NEXT_SYNC, G_POPULATED,
 G_MMU_SEQ, G_INV_IN_PROGRESS, G_INV_START, G_INV_END, G_ROOT_CHECK, G_LOCKED_CHECK, G_PRE_LOCK,
 G_EVENTS, G_UFFD, G_PFN_BASE, G_GUEST_REFS, G_MAX_CLASS, G_NEV, G_NSRV, G_NSRCU, G_GRANT_T, G_NLEFT, G_NEXT_T,
 G_NEXT_P, G_PROGRAM, G_NLW, G_LEGACY, G_N_MAX, G_SPAN_SHIFT, G_CHECKER, G_LOCKSTEP, G_SHADOW) = range(37)  # fmt: skip
G_EV_KIND = 37  # + EV_*: the sink's kind id of each record the loop makes (2 entries)
G_RET_NAME = 39  # + a RET_PF_* code: the sink's string id of its name (7 entries)
G_COLS = 46
# G_LEGACY: the legacy MMU's faults (write lock, direct_map); G_N_MAX: its n_max_mmu_pages;
# G_SPAN_SHIFT: the 4K host mapping's span_shift (for host_pfn). G_CHECKER: the invariant checker is
# on (SPTE changes are logged; a fault on an obsolete root goes to Python). G_LOCKSTEP: vCPUs may
# restrict SPTEs (``Vm.lockstep``), so a member's stretch of accesses ends where another member or
# the queue's head acts. G_SHADOW: shadow paging (every #PF exit goes to Python).
CHG_ROOM = 64  # change-log rows a fault in the loop may add at most (its walk, links, leaf, prefetch)

# The costs ``c``.
(C_GUEST, C_HIT, C_REF, C_VMEXIT, C_VMENTRY, C_FAULTIN, C_HOST, C_ZERO, C_MAP, C_SP, C_SPLIT, C_TLB_FLUSH,
 C_USERSPACE_EXIT, C_FAST, C_LEGACY_MAP, C_PREFETCH) = range(16)  # fmt: skip
# Columns of the memslot rows: base gfn, pages, host offset, whether the loop may fault pages in
# (valid, not dirty-logged, on the 4K host mapping), and whether it may take fast_page_fault there
# (FAST_SLOT: valid and not dirty-logged; FAST_BITMAP: the dirty-logged slot whose bitmap it has).
SL_BASE, SL_NPAGES, SL_HOST_OFF, SL_FAULTIN, SL_FAST = range(5)
FAST_SLOT, FAST_BITMAP = 1, 2
FLUSH_REQUESTS = KVM_REQ_TLB_FLUSH | KVM_REQ_TLB_FLUSH_CURRENT  # the requests the loop services itself

# Why run_group returned (G_STOP).
GS_EXTERNAL = 1  # the next member acts at or after the queue head (or there is none)
GS_LEAVE = 2  # members left the group (``left[:g[G_NLEFT]]``, in key order)
GS_GROW = 3  # an install needs more tables than the pool has room for: grow it and call again
GS_FLUSH = 4  # an output buffer is full: drain it and call again
GS_GRANT = 5  # mmu_lock was released with a Python waiter at the queue's head: hand it over at G_GRANT_T
GS_CHUNK = 6  # member G_STOP_M needs its next chunk of accesses (or has none: it leaves)
HANDED = 7  # (not a stop) a release handed mmu_lock to a member, whose action now comes first

# Output records.
EV_PAGE_FAULT, EV_PAGE_FAULT_RET = 0, 1  # their rows carry the sink's ids (G_EV_KIND, G_RET_NAME)
RET_PF_RETRY, RET_PF_FIXED, RET_PF_SPURIOUS = 1, 5, 6
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_GUEST_FINAL_MASK = 1 << 32
SRCU_FORGET = -1  # a srcu output whose reader is simply dropped (registered earlier, ended early)
