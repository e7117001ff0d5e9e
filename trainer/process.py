"""Training, prediction and the review audit in separate OS processes, driven through pipes.

Why a process and not a thread: a training loop in a thread of the GUI's process holds
the GIL between kernels and made napari stutter (p99 browse step 185 ms, worst 406 ms,
against 69 ms idle); the same loop in a process at lowered priority left browsing
unchanged. GPU memory is also only returned when a process ends.

Every job (training, prediction, the review audit) runs through one wrapper: the parent
sends commands (``("stop",)``, ``("preview", [indices])``, ``("pause", seconds)``) and
reads typed events without blocking (:meth:`ChildJob.events`). The child checks its parent between
steps and stops when the parent is gone, so closing (or killing) the GUI leaves no
orphan behind. Only this module's plain functions run in the child: no Qt, no napari.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from typing import Any

import numpy as np

from . import events as ev
from .child_os import SUSPENDABLE, lower_priority, spawning, wake_when_parent_dies
from .config import TrainConfig
from .jobs import KNOWN_ERRORS, DatasetSpec, audit_job, predict_job, stored_audit_job, suggest_job, train_job


def _commands(conn, control) -> None:
    """Read the parent's commands into ``control``; a vanished parent means stop."""
    parent = os.getppid()

    def poll() -> None:
        if os.getppid() != parent:  # the GUI is gone
            control.request_stop()
        while conn.poll():
            command = conn.recv()
            if command[0] == "stop":
                control.request_stop()
            elif command[0] == "preview":
                control.request_preview(command[1])
            elif command[0] == "pause":
                control.pause(command[1])

    control.poll = poll


def _serve(conn, job, args: tuple, preview: dict) -> None:
    """The one body of every child: lower priority, take commands, run the job with an
    ``emit`` that sends its events, and turn any exception into a ``Failed`` event with a
    message for people."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the GUI's terminal is the GUI's
    wake_when_parent_dies()
    lower_priority()
    try:
        from .control import TrainControl

        control = TrainControl(
            preview_indices=list(preview.get("indices", [])), preview_every_s=preview.get("every_s")
        )
        _commands(conn, control)
        job(control, conn.send, *args)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as an event
        message = str(exc) if str(exc) else type(exc).__name__
        if type(exc).__name__ not in KNOWN_ERRORS:
            message = f"{type(exc).__name__}: {message}\n{traceback.format_exc(limit=6)}"
        try:
            conn.send(ev.Failed(message))
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()


class _Spawned:
    """A spawned child with one end of a pipe; never blocks the caller."""

    def __init__(self, target, *args: Any) -> None:
        ctx = mp.get_context("spawn")  # fork is unsafe with Qt and CUDA
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        with spawning():
            self.process.start()
        child_conn.close()
        self.closed = False

    def send(self, *command: Any) -> bool:
        if self.closed:
            return False
        try:
            self.conn.send(command)
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self, limit: int = 200) -> list:
        """Whatever arrived, without waiting (at most ``limit`` messages)."""
        out = []
        if self.closed:
            return out
        try:
            while len(out) < limit and self.conn.poll():
                out.append(self.conn.recv())
        except (EOFError, OSError):
            self.closed = True
        return out

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)

    def join(self, timeout: float | None = None) -> None:
        self.process.join(timeout)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory, or stopped from outside)" if name == "SIGKILL" else ""
        return f"was ended by {name}{hint}"
    return f"exited with code {code}"


class ChildJob:
    """A job in a spawned child process, seen from the parent.

    ``events()`` returns the typed events that arrived since the last call and never
    waits. When the child dies without a final event (killed, crashed), a synthetic
    ``Failed`` event says how. ``pause(seconds)`` holds the job between steps;
    ``stop()`` asks it to end (training saves a checkpoint first).
    """

    what = "job"

    def __init__(self, job, *args: Any, preview: dict | None = None) -> None:
        self.child = _Spawned(_serve, job, args, preview or {})
        self.suspended = False
        self.finished = False
        self.last_checkpoint: str | None = None

    def events(self) -> list[ev.Event]:
        dead = not self.child.alive  # read before draining, so nothing sent is missed
        out = self.child.receive(limit=10**6 if dead else 200)
        for e in out:
            if isinstance(e, ev.Checkpoint):
                self.last_checkpoint = e.path
            if isinstance(e, ev.JOB_END):
                self.finished = True
        if not self.finished and dead:
            self.finished = True
            out.append(
                ev.Failed(
                    f"The {self.what} process {describe_exit(self.child.exitcode)} before finishing.",
                    last_good_checkpoint=self.last_checkpoint,
                )
            )
        return out

    @property
    def running(self) -> bool:
        return not self.finished

    def pause(self, seconds: float) -> None:
        """Hold the job between its steps for ``seconds`` (it goes on by itself)."""
        self.child.send("pause", float(seconds))

    def hold(self, seconds: float) -> None:
        """Give the CPU back now, for a person at the screen: suspend the child at once
        where that is safe (Linux, where a suspended child still wakes when its parent
        dies), else pause it at its next step for ``seconds``. ``release()`` ends it."""
        if SUSPENDABLE and self.child.alive:
            if not self.suspended:
                try:
                    os.kill(self.child.process.pid, signal.SIGSTOP)
                    self.suspended = True
                except OSError:
                    pass
        else:
            self.pause(seconds)

    def release(self) -> None:
        if self.suspended:
            self.suspended = False
            try:
                os.kill(self.child.process.pid, signal.SIGCONT)
            except OSError:
                pass

    def stop(self) -> None:
        self.release()
        self.child.send("stop")

    def kill(self) -> None:
        self.child.kill()  # SIGKILL ends a suspended child too

    def close(self, timeout: float = 10.0) -> None:
        """Stop gracefully, wait up to ``timeout`` seconds, then kill."""
        if self.child.alive:
            self.stop()
            self.child.join(timeout)
        self.child.kill()


class TrainingProcess(ChildJob):
    """One training run: ``fit()``'s events (Started ... Finished, Stopped or Failed)."""

    what = "training"

    def __init__(
        self,
        spec: DatasetSpec,
        cfg: TrainConfig,
        run_dir: str | None,
        resume: str | None = None,
        preview_indices: list[int] | None = None,
        preview_every_s: float | None = 3.0,
    ) -> None:
        preview = {"indices": list(preview_indices or []), "every_s": preview_every_s}
        super().__init__(train_job, spec, cfg.to_dict(), run_dir, resume, preview=preview)
        self.run_dir = run_dir

    def request_preview(self, indices: list[int]) -> None:
        self.child.send("preview", [int(i) for i in indices])


class PredictionProcess(ChildJob):
    """Predict a whole dataset from a checkpoint: ``Progress`` events, then ``Predicted``."""

    what = "prediction"

    def __init__(
        self,
        spec: DatasetSpec,
        checkpoint: str,
        device: str = "auto",
        batch_size: int | None = None,
        confidence: bool = False,
        out: str | None = None,
    ) -> None:
        """``batch_size``: images per forward pass; by default as many pixels as 32
        images of 64x128 (:func:`~trainer.inference.predict_batch`). ``out``: where the
        masks of a dataset read from disk go (a zarr array; ``PredictedOnDisk`` follows)."""
        super().__init__(predict_job, spec, checkpoint, device, batch_size, confidence, out)


class SuggestProcess(ChildJob):
    """Rank unlabelled images for labelling next: ``Progress`` events, then ``Suggested``."""

    what = "label-next ranking"

    def __init__(
        self, pool: np.ndarray, labelled: np.ndarray | None, checkpoint: str, top: int | None = None
    ):
        super().__init__(suggest_job, pool, labelled, checkpoint, top)


class AuditProcess(ChildJob):
    """Rank masks that are probably wrong: ``Progress`` events, then ``Ranked``.
    ``minutes`` is a budget of compute, not of wall-clock time."""

    what = "ranking"

    def __init__(
        self, images: np.ndarray, masks: np.ndarray, excluded, minutes: float, folds: int = 3, classes=None
    ) -> None:
        super().__init__(audit_job, images, masks, sorted(excluded), minutes, folds, classes)

    @classmethod
    def of_stored(cls, spec: DatasetSpec, minutes: float, folds: int = 3) -> AuditProcess:
        """The audit of a converted dataset that the child reads from disk, with the
        corrections saved in its store (``spec``: as a training from napari gets it)."""
        job = cls.__new__(cls)
        ChildJob.__init__(job, stored_audit_job, spec, minutes, folds)
        return job
