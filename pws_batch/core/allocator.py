"""glibc malloc settings for generating on a CPU (no torch here: the driver imports this to start CPU actors).

Generating on a CPU allocates and frees the same large activations at every step (the VAE decoder's are tens to
hundreds of MB). With glibc's defaults each such block is a fresh `mmap` (above the mmap threshold) or comes from
a per-thread arena that gives its pages back: every step then faults its pages in again, zeroed by the kernel.
Measured with the tiny models on 2 cores (8 candidates x 20 steps): ~1.4 million page faults per pair and about a
third of the CPU time in the kernel; with the settings below ~25 times fewer, and the work 1.3-1.4x faster
(`pws-batch bench pipeline --compare-malloc`).

- `MALLOC_ARENA_MAX=1`: every thread allocates from the main heap (the models run on threads of their own).
- `MALLOC_MMAP_MAX_=0`: no block is mmap'ed: large ones come from the heap and are reused.
- `MALLOC_TRIM_THRESHOLD_`: freed memory is kept, not returned: the next step needs it again.

The price is resident memory that stays at its peak (measured +20-50 % for the tiny models), which is why they are
for CPU generation only: a GPU worker's big host allocations are the weights it loads once and moves to the GPU,
which must be given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

CPU_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def malloc_env_started_with() -> dict[str, str]:
    """The variables of CPU_MALLOC_ENV this process was started with (glibc reads them only at start)."""
    return {k: os.environ[k] for k in CPU_MALLOC_ENV if k in os.environ}


# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def _glibc():
    """libc when it is glibc (has mallopt and gnu_get_libc_version), else None (musl, macOS ...)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError outside glibc
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """The settings of CPU_MALLOC_ENV, for a process already running (the `generate` command, a script): they
    apply to the blocks allocated from now on, by this thread and by threads that have not allocated yet (a
    thread that already has an arena of its own keeps it: a new process gets CPU_MALLOC_ENV instead, as the
    CPU actors do). Returns whether they were applied (glibc only)."""
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
