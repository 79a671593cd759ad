"""Keep the freed memory of a CPU process's training steps and forwards instead of handing it back
to the system after each one.

Why: glibc's malloc returns the top of its heap to the system once more than its trim threshold
lies free there, and takes fresh pages from the system (a page fault each, the page zeroed) when
the heap grows again. The DiT's forward and backward free their activations, and KIND's its folded
per-group weights, in an order that often leaves the heap's top free after a call: on the default
tiny model, thousands of page faults a training step or guided sampling forward, more for KIND
than for dense and varying with the heap's history, up to 30 % of a sampling forward's time
(`benchmarks/bench_host_memory.py`, BENCHMARKS.md). glibc would keep that memory itself once its
adaptive threshold had met a large enough block, but only up to 64 MiB free at the heap's top
(twice its largest mmap threshold), and a step's frees can leave more than that at the top,
depending on where the process's allocations landed: one test run's fresh process refaulted
16,514 pages (64.5 MiB) every step at that threshold, and at 32 MiB two fresh processes in six
did (BENCHMARKS.md). This sets the mmap threshold to glibc's ceiling (32 MiB: smaller blocks come
from the heap) and the trim threshold to 512 MiB, so a process keeps what its steps free and
hands the heap's top back only past that; blocks of 32 MiB and more are still mapped and unmapped
each call. A library allocator swapped in with LD_PRELOAD
(jemalloc, tcmalloc) does the same, but has to be set before the process starts; this is one call
at the start of a command, a job's process, or `kind.training.train` on a CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 512 * 2**20  # above what a step frees at the top (see above)


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's trim and mmap thresholds for this process (see the module docstring; another
    `trim_threshold`, in bytes, for benchmarks/bench_host_memory.py); True when they were set,
    False where the C library is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    done = done and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("malloc thresholds %s", "set" if done else "left as they were")
    return done
