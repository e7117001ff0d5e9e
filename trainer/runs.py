"""Run directories: the config, every event as a JSON line, checkpoints, previews, a summary.

Layout::

    RUN/config.toml         the full configuration
    RUN/split.json          training and validation indices
    RUN/events.jsonl        one JSON event per line, as fit() yields them
    RUN/metrics.csv         one row per validation, for spreadsheets and pandas
    RUN/tensorboard/        scalars for TensorBoard, when the tensorboard package is installed
    RUN/checkpoints/best.pt, RUN/checkpoints/last.pt
    RUN/previews/latest.npz the latest predicted preview masks (indices, masks, entropy)
    RUN/summary.json        written when the run ends

A run directory can be read while the run writes it (the GUI attaches this way).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .classes import CLASSES, ClassTable
from .config import TrainConfig, to_toml
from .events import Event, Preview, Step, Validation


def metrics_columns(classes: ClassTable = CLASSES) -> list[str]:
    """metrics.csv's header: one IoU column per class of the run's table."""
    return (
        ["epoch", "step", "seconds", "train_loss", "lr"]
        + [f"iou_{c.name.lower().replace(' ', '_')}" for c in classes]
        + ["miou", "miou_keras", "pixel_accuracy", "images"]
    )


METRICS_COLUMNS = metrics_columns()


def _tensorboard_writer(path: Path):
    """A SummaryWriter when the optional tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(path))


CHECKPOINTS = ("best", "last")


def checkpoint_file(path: str | Path, which: str = "best") -> Path:
    """``path`` itself when it is not a directory. In a run directory (or its
    ``checkpoints`` folder): its ``which`` checkpoint (``best`` or ``last``), else the
    other (a run stopped before its first validation has only ``last``). A directory with
    neither raises :class:`FileNotFoundError` saying so."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    order = (which, *(c for c in CHECKPOINTS if c != which))
    for name in order:
        if (folder / f"{name}.pt").is_file():
            return folder / f"{name}.pt"
    raise FileNotFoundError(
        f"{path}: a folder without checkpoints (a run directory holds checkpoints/best.pt and last.pt)"
    )


class RunDirError(OSError):
    """The run directory cannot be created or written."""


def new_run_dir(root: str | Path, prefix: str = "") -> Path:
    """A new, empty run directory under ``root`` (created, with ``root``), named by the
    local time after ``prefix``, with ``-2``, ``-3``... when a run of the same second has
    the name already."""
    stamp, k = prefix + time.strftime("%Y%m%d-%H%M%S"), 1
    Path(root).mkdir(parents=True, exist_ok=True)
    while True:
        path = Path(root) / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1


def holds_run(path: Path) -> bool:
    events = path / "events.jsonl"
    return events.is_file() and events.stat().st_size > 0


class RunDir:
    """A run's directory, created when needed. One that holds another run already is
    refused (its records would mix with this run's), unless this run continues it:
    ``continues`` is a checkpoint inside it."""

    def __init__(self, path: str | Path, continues: str | Path | None = None) -> None:
        self.path = Path(path)
        inside = continues is not None and self.path.resolve() in Path(continues).resolve().parents
        if holds_run(self.path) and not inside:
            raise RunDirError(
                f"{self.path}: holds another run already (its events, metrics and checkpoints); train into a "
                "new directory, or resume this run from its own checkpoint"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(
                f"{self.path}: cannot write the run directory ({exc.strerror or exc})"
            ) from None
        self._events = None
        self._tensorboard = None
        self.classes: ClassTable = CLASSES  # the run's table, from write_start

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / f"{CHECKPOINTS[0]}.pt"

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / f"{CHECKPOINTS[1]}.pt"

    def write_start(
        self, cfg: TrainConfig, train_idx, val_idx, classes: ClassTable = CLASSES, absent=()
    ) -> None:
        """The run's config, split and class table (``classes.json``: the table, and the
        classes left out of predictions as the training labels never hold them)."""
        split = {"train": [int(i) for i in train_idx], "val": [int(i) for i in val_idx]}
        self.classes = classes
        table = {"classes": classes.records(), "absent": [int(c) for c in absent]}
        try:
            _atomic_write(self.path / "config.toml", to_toml(cfg))
            _atomic_write(self.path / "split.json", json.dumps(split))
            _atomic_write(self.path / "classes.json", json.dumps(table, indent=1))
        except OSError as exc:
            from .outputs import why_not_written

            raise RunDirError(
                f"{self.path}: cannot write the run directory ({why_not_written(exc)})"
            ) from None

    def write_event(self, event: Event) -> None:
        """Record ``event``; a run directory that can no longer be written (a full disk)
        is a :class:`RunDirError` naming it, not a traceback."""
        try:
            self._write_event(event)
        except OSError as exc:
            if isinstance(exc, RunDirError):
                raise
            from .outputs import why_not_written

            raise RunDirError(
                f"{self.path}: cannot write the run directory ({why_not_written(exc)}); training stopped"
            ) from None

    def _write_event(self, event: Event) -> None:
        if self._events is None:
            self._events = open(self.path / "events.jsonl", "a", buffering=1)  # noqa: SIM115 - kept open
        self._events.write(json.dumps(event.to_json()) + "\n")
        if isinstance(event, Validation):
            self._write_metrics_row(event)
        if isinstance(event, (Step, Validation)):
            self._write_scalars(event)
        if isinstance(event, Preview):
            previews = self.path / "previews"
            previews.mkdir(exist_ok=True)
            tmp = previews / "latest.tmp.npz"
            arrays = {
                "indices": np.asarray(event.indices),
                "masks": event.masks,
                "epoch": np.asarray(event.epoch),
            }
            if event.entropy is not None:
                arrays["entropy"] = event.entropy
            np.savez(tmp, **arrays)
            os.replace(tmp, previews / "latest.npz")

    def _write_metrics_row(self, e: Validation) -> None:
        path = self.path / "metrics.csv"
        new = not path.exists()
        values = [e.epoch, e.step, round(e.seconds, 3), e.train_loss, e.lr, *e.iou]
        values += [e.miou, e.miou_keras, e.pixel_accuracy, e.images]
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(metrics_columns(self.classes))
            # Empty cells (not "nan") for missing values: spreadsheets and pandas read them as blank/NaN.
            writer.writerow(
                ["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
            )

    def _write_scalars(self, e: Step | Validation) -> None:
        if self._tensorboard is None:
            self._tensorboard = _tensorboard_writer(self.path / "tensorboard") or False
        tb = self._tensorboard
        if not tb:
            return
        if isinstance(e, Step):
            tb.add_scalar("train/loss", e.loss, e.step)
            tb.add_scalar("train/lr", e.lr, e.step)
            tb.add_scalar("train/images_per_s", e.images_per_s, e.step)
            return
        for c, v in zip(self.classes, e.iou, strict=True):
            if not math.isnan(v):
                tb.add_scalar(f"val_iou/{c.name}", v, e.step)
        for name in ("miou", "miou_keras", "pixel_accuracy"):
            value = getattr(e, name)
            if not math.isnan(value):
                tb.add_scalar(f"val/{name}", value, e.step)
        tb.flush()

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=1))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._tensorboard:
            self._tensorboard.close()
            self._tensorboard = None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
