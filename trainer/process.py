"""Training in a separate OS process, driven through a pipe.

Why a process and not a thread: a training loop in a thread of the GUI's process holds
the GIL between kernels and made napari stutter (p99 browse step 185 ms, worst 406 ms,
against 69 ms idle); the same loop in a process at lowered priority left browsing
unchanged. GPU memory is also only returned when a process ends.

The parent sends commands (``("stop",)``, ``("preview", [indices])``) and reads events
without blocking (:meth:`TrainingProcess.events`). The child checks its parent between
steps and stops when the parent is gone, so closing (or killing) the GUI leaves no
orphan behind. Only this module's plain functions run in the child: no Qt, no napari.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import events as ev
from .config import TrainConfig

NICE = 15


@dataclass
class DatasetSpec:
    """How the child gets its data: a path (npz, folder, ``synthetic:N:SEED``) or arrays."""

    path: str | None = None
    mask_mapping: str = "identity"
    size: tuple[int, int] | None = None
    images: np.ndarray | None = None
    masks: np.ndarray | None = None
    source: str = ""
    corrections_path: str | None = None  # a CorrectionStore the training re-reads every epoch
    corrections_hash: str = ""

    def open_corrections(self, dataset):
        if not self.corrections_path:
            return None
        from .corrections import CorrectionStore

        return CorrectionStore(
            self.corrections_path, self.corrections_hash, len(dataset), dataset.image_shape, readonly=True
        )

    def load(self):
        from .dataset import Dataset
        from .formats import open_dataset

        if self.images is not None:
            return Dataset(images=self.images, masks=self.masks, source=self.source or "arrays")
        return open_dataset(self.path, mask_mapping=self.mask_mapping, size=self.size)


def _lower_priority() -> None:
    """Make the child yield the CPU to the GUI: SCHED_IDLE where Linux offers it (runs
    only on otherwise idle cores), plus a high nice value everywhere else."""
    try:
        os.nice(NICE)
    except (AttributeError, OSError):  # Windows, or not permitted: run at normal priority
        pass
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def _child_train(
    conn, spec: DatasetSpec, cfg_dict: dict, run_dir: str | None, resume: str | None, preview: dict
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the GUI's terminal is the GUI's
    _lower_priority()
    parent = os.getppid()
    try:
        from .config import from_dict
        from .engine import TrainControl, fit

        control = TrainControl(
            preview_indices=list(preview.get("indices", [])), preview_every_s=preview.get("every_s")
        )

        def poll() -> None:
            if os.getppid() != parent:  # the GUI is gone
                control.request_stop()
            while conn.poll():
                command = conn.recv()
                if command[0] == "stop":
                    control.request_stop()
                elif command[0] == "preview":
                    control.request_preview(command[1])

        control.poll = poll
        cfg = from_dict(cfg_dict)
        dataset = spec.load()
        store = spec.open_corrections(dataset)
        for event in fit(dataset, cfg, run_dir, control=control, resume=resume, corrections=store):
            conn.send(event)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as an event
        message = str(exc) if str(exc) else type(exc).__name__
        known = ("DatasetError", "ConfigError", "CheckpointError", "DeviceError", "RunDirError")
        if type(exc).__name__ not in known:
            message = f"{type(exc).__name__}: {message}\n{traceback.format_exc(limit=6)}"
        try:
            conn.send(ev.Failed(message))
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()


def _child_predict(conn, spec: DatasetSpec, checkpoint: str, device: str, batch_size: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority()
    try:
        from .checkpoint import load_checkpoint, model_from_checkpoint
        from .device import resolve_device
        from .inference import predict_arrays

        dev = resolve_device(device)
        model, _ = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
        model = model.to(dev)
        dataset = spec.load()

        def progress(done: int, total: int) -> None:
            conn.send(("progress", done, total))

        out = predict_arrays(model, dataset.images, batch_size, dev, with_entropy=True, progress=progress)
        conn.send(("result", out["masks"], out["entropy"]))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", str(exc) or type(exc).__name__))
    finally:
        conn.close()


def child_audit(conn, images, masks, excluded, minutes: float, folds: int) -> None:
    """Runs in a child process: the audit, with progress messages, then the ranking and
    the out-of-fold predicted masks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority()
    try:
        from .audit import audit
        from .dataset import Dataset

        ds = Dataset(images=images, masks=masks, source="review")
        ranking, pred, _ = audit(
            ds,
            folds=folds,
            minutes=minutes,
            excluded=set(excluded),
            progress=lambda t: conn.send(("progress", t)),
        )
        conn.send(("result", ranking, pred))
    except BaseException as exc:  # noqa: BLE001 - reported to the GUI
        conn.send(("error", str(exc) or type(exc).__name__))
    finally:
        conn.close()


class _Child:
    """A spawned child with one end of a pipe; never blocks the caller."""

    def __init__(self, target, *args: Any) -> None:
        ctx = mp.get_context("spawn")  # fork is unsafe with Qt and CUDA
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        # OpenMP threads that spin while waiting would take CPU from the GUI even at the
        # lowest priority; the child inherits the environment at spawn.
        saved = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            self.process.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = saved
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


class TrainingProcess:
    """One training run in a child process.

    ``events()`` returns the events that arrived since the last call. When the child
    dies without a terminal event (killed, crashed), a synthetic ``Failed`` event says so.
    """

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
        self.run_dir = run_dir
        self.child = _Child(_child_train, spec, cfg.to_dict(), run_dir, resume, preview)
        self.finished = False
        self.last_checkpoint: str | None = None

    def stop(self) -> None:
        """Ask for a graceful stop: the run saves a checkpoint and sends ``Stopped``."""
        self.child.send("stop")

    def request_preview(self, indices: list[int]) -> None:
        self.child.send("preview", [int(i) for i in indices])

    def events(self) -> list[ev.Event]:
        dead = not self.child.alive  # read before draining, so nothing sent is missed
        out = self.child.receive(limit=10**6 if dead else 200)
        for e in out:
            if isinstance(e, ev.Checkpoint):
                self.last_checkpoint = e.path
            if isinstance(e, ev.TERMINAL):
                self.finished = True
        if not self.finished and dead:
            self.finished = True
            out.append(
                ev.Failed(
                    f"The training process {describe_exit(self.child.exitcode)} before finishing.",
                    last_good_checkpoint=self.last_checkpoint,
                )
            )
        return out

    @property
    def running(self) -> bool:
        return not self.finished

    def kill(self) -> None:
        self.child.kill()

    def close(self, timeout: float = 10.0) -> None:
        """Stop gracefully, wait up to ``timeout`` seconds, then kill."""
        if self.child.alive:
            self.stop()
            self.child.join(timeout)
        self.child.kill()


class PredictionProcess:
    """Predict a whole dataset from a checkpoint in a child process."""

    def __init__(
        self, spec: DatasetSpec, checkpoint: str, device: str = "auto", batch_size: int = 64
    ) -> None:
        self.child = _Child(_child_predict, spec, checkpoint, device, batch_size)
        self.finished = False

    def messages(self) -> list[tuple]:
        dead = not self.child.alive
        out = self.child.receive(limit=10**6 if dead else 200)
        if any(m[0] in ("result", "error") for m in out):
            self.finished = True
        elif not self.finished and dead:
            self.finished = True
            out.append(("error", f"The prediction process {describe_exit(self.child.exitcode)}."))
        return out

    def kill(self) -> None:
        self.child.kill()
