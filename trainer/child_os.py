"""What a child job is started with and how it sets itself up as an operating-system
process: its priority, waking when its parent dies, and a spawn that neither re-runs the
person's script nor lets OpenMP threads spin. :mod:`trainer.process` runs the jobs."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

NICE = 5  # CFS gives a nice-5 job a quarter of a core beside a busy nice-0 program


SUSPENDABLE = sys.platform.startswith("linux")
"""Children may be suspended (SIGSTOP) only where the kernel wakes them when the parent
dies (PR_SET_PDEATHSIG), so that a GUI killed mid-browse leaves no frozen orphan."""


def wake_when_parent_dies() -> None:
    """Linux: SIGCONT when the parent dies, so a suspended child resumes, sees its parent
    gone and stops gracefully (saving a checkpoint) instead of staying frozen."""
    if not SUSPENDABLE:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGCONT))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lower_priority() -> None:
    """Make the child give way to the GUI but compete with other programs: an ordinary
    raised nice value. Not SCHED_IDLE, which runs a job only on cores nothing else wants:
    beside a browser or a build it starved a 1.5-minute training run to 20 steps, with no
    word why. The person at the screen is served by suspending jobs while they interact
    (:meth:`trainer.process.ChildJob.hold`)."""
    try:
        os.nice(NICE)
    except (AttributeError, OSError):  # Windows, or not permitted: run at normal priority
        pass


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """A spawned child imports the parent's ``__main__`` again (as ``__mp_main__``): a
    person's napari script without ``if __name__ == "__main__":`` would run once more in
    every child job. The children run functions of this package and need nothing of the
    script, so while one starts the script's name is hidden from ``multiprocessing``."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


@contextmanager
def spawning() -> Iterator[None]:
    """While a child process starts: OpenMP threads that spin while waiting would take CPU
    from the GUI even at a raised nice value (the child inherits the environment at spawn),
    and the person's script is not run again in it."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        with _main_script_hidden():
            yield
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved
