"""Process-wide settings that make CPU training faster.

glibc's ``malloc`` serves every block above 32 MiB with a fresh ``mmap`` and returns it to the
OS on ``free``; the next step's tensor of the same size then page-faults its way back in, the
kernel zeroing every 4 KiB page. A spiking U-Net has S times the ANN's activations, so at
CIFAR-10 size on a CPU its largest tensors (32-48 MiB) cost 0.3-2 s of system time per training
step that the ANN twin (8-12 MiB tensors, served from the heap) does not pay.
:func:`retain_freed_memory` asks ``malloc`` to serve large blocks from its heap and to keep freed
memory for reuse, as a caching allocator does (CUDA's, or jemalloc/tcmalloc for CPUs). Memory
is then reused rather than returned to the OS; fragmentation costs some RSS (measured on the
cifar10 training step at batch 8: peak RSS about 10 % higher, see benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Keep freed heap memory for reuse in this process (glibc on Linux; see the module doc).

    Returns whether it took effect: ``False`` on other platforms and C libraries, where
    nothing is changed. Safe to call more than once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
