"""What runs beside ``fit()``: commands into it, and where a run stands.

``TrainControl`` is how another thread (a process wrapper, the CLI's Ctrl-C handler)
talks to a running ``fit()``; ``RunState`` is what a checkpoint records so that a
resumed run goes on exactly where it was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TrainControl:
    """Commands into a running ``fit()``, safe to call from another thread.

    ``poll`` (optional) is called between steps; a process wrapper uses it to read
    commands from a pipe and call the methods below.

    ``pause(seconds)`` holds the run between steps for that long after the call (a person
    is browsing or painting and should have the CPU); previews are still answered while
    paused, and paused time does not count against the run's time budget.

    ``clock`` (optional) measures the time budget instead of the wall clock; the audit
    passes a compute clock so that sharing the CPU does not shrink its models.
    """

    preview_indices: list[int] = field(default_factory=list)
    preview_every_s: float | None = None  # also preview between steps at this interval
    poll: Callable[[], None] | None = None
    clock: Callable[[], float] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _preview_now: threading.Event = field(default_factory=threading.Event)
    _paused_until: float = 0.0

    def pause(self, seconds: float) -> None:
        """Hold the run between steps until ``seconds`` from now (extends, never shortens)."""
        self._paused_until = max(self._paused_until, time.monotonic() + max(float(seconds), 0.0))

    @property
    def paused(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._paused_until

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_preview(self, indices: list[int]) -> None:
        self.preview_indices = [int(i) for i in indices]
        self._preview_now.set()

    def take_preview_request(self) -> bool:
        """True once after each :meth:`request_preview`."""
        asked = self._preview_now.is_set()
        self._preview_now.clear()
        return asked


@dataclass
class RunState:
    """Where a run stands. Saved in every checkpoint, so a resumed run goes on exactly
    where this one was (``batch`` batches of ``epoch`` done)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: float = -1.0
    plateau_factor: float = 1.0
    stale: int = 0
    elapsed_s: float = 0.0

    @classmethod
    def from_checkpoint(cls, data: dict) -> RunState:
        # Checkpoints written before mid-epoch resume existed only hold finished epochs.
        resume = data.get("resume") or {"epoch": data["epoch"] + 1, "batch": 0}
        return cls(
            epoch=int(resume["epoch"]),
            batch=int(resume["batch"]),
            step=int(data["step"]),
            best=float(data.get("best_miou", -1.0)),
            plateau_factor=float(data.get("plateau_factor", 1.0)),
            stale=int(data.get("stale", 0)),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
        )
