"""Keep freed tensor memory in the process between training steps (glibc on Linux).

A training step allocates and frees the same few hundred megabytes of activations and
gradients every time. glibc's ``malloc`` serves a block over its mmap threshold (128 KiB
at start, adjusted upwards as blocks are freed) with a fresh ``mmap`` and gives it back to
the system on ``free``; it also trims the heap's free top above 128 KiB. Either way the
next step touches new pages, and the kernel zero-fills each on its first touch: thousands
of page faults a step with the ``cpu`` preset, a few percent of the step, and up to half
the time of the augmentation and the loss, whose tensors are small enough for a fault to
cost more than the arithmetic on the page (``bench/train_throughput.py`` measures both
sides: ``allocator_bare_img_s``).

:func:`keep_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit)
and the trim threshold to min(1 GiB, RAM / 8): tensors up to 32 MiB come from the heap and
go back to it, and the process keeps up to that much freed memory for the next step
instead of handing it back. It is what Intel's CPU launcher gets by preloading jemalloc,
without a dependency. It changes nothing where the C library is not glibc, nothing when
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` are set (the user's choice wins),
and nothing with ``MARS_TRAINER_ALLOCATOR=system``. Called by ``fit()`` and the CLI; the
napari viewer's own process is left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT = "MARS_TRAINER_ALLOCATOR"  # "system": leave the allocator alone

_state: str | None = None


def trim_threshold() -> int:
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return max(MMAP_THRESHOLD, min(1 << 30, ram // 8))


def keep_freed_memory() -> str:
    """Tune glibc's allocator once per process (see the module docstring); returns what
    was done, in words: ``"tuned"``, or why not."""
    global _state
    if _state is None:
        _state = _tune()
    return _state


def _tune() -> str:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: the C library's allocator is left as it is"
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return f"{OPT_OUT}=system: the allocator is left as it is"
    if any(name in os.environ for name in USER_SETTINGS):
        return "MALLOC_*_THRESHOLD_ set in the environment: left as the user set it"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "mallopt not found: the allocator is left as it is"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, trim_threshold())):
        return "mallopt refused the thresholds: the allocator is left as it is"
    return "tuned"
