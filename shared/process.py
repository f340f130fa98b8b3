"""Children that end with the process that started them, however it ends."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """subprocess's preexec_fn: the kernel sends the child SIGTERM (its clean path) when the
    thread that started it ends, by SIGKILL too, which runs no cleanup of ours. It is the thread,
    not the process: start such children from a thread that lives as long as they should."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def return_freed_memory() -> None:
    """glibc keeps what a process freed for its next allocations (malloc_trim gives the free
    pages back). The learner's update frees ~1 GiB of activations and gradients that the server
    beside it can use until the next update; elsewhere (no glibc) this does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)
