"""Qt-free record of a training run as the GUI shows it: curves, IoU, progress, status.

It takes events either as objects (from a live training process) or as the dicts of a
run directory's ``events.jsonl`` (attaching to a run started elsewhere), so both paths
show exactly the same thing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.events import Event, cpu_share_text


def _as_dict(event) -> dict:
    return event.to_json() if isinstance(event, Event) else dict(event)


def notice(event) -> str | None:
    """The text of an event that tells the person something and counts nothing (a
    ``Progress`` without a total: a step that could not become a CUDA graph, a budget too
    short to train in), else None."""
    e = _as_dict(event)
    return e.get("text") or None if e.get("kind") == "progress" and not e.get("total") else None


@dataclass
class RunRecord:
    """One training run as the GUI shows it, built from its events."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_iou: list[list[float]] = field(default_factory=list)  # per validation, 5 by class id
    val_miou: list[float] = field(default_factory=list)
    val_miou_keras: list[float] = field(default_factory=list)  # as Keras MeanIoU(ignore_class=0) prints it
    best_miou: float = math.nan
    latest_confusion: list | None = None
    epoch: int = 0
    progress: float = 0.0
    images_per_s: float = 0.0
    eta_s: float | None = None
    cpu_note: str = ""  # "training gets 0.2 of a core: other programs are busy", or ""
    device: str = ""
    state: str = "idle"  # idle, starting, running, stopping, finished, stopped, failed
    message: str = ""
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    run_dir: str | None = None
    corrected: int = 0
    excluded: int = 0
    newly_labelled: int = 0
    background_weight: float = 0.0
    classes: list = field(default_factory=list)  # the run's class table (records), from Started
    absent: list = field(default_factory=list)  # ids not in the training labels: never predicted
    activity: str = ""  # what the run does between steps (a long validation), said by Progress

    def _in_run(self, path: str | None) -> str | None:
        """A checkpoint as the run recorded it, found in this run's directory: the trainer
        records the path it was given (relative to where it ran), and the directory may
        have moved since. As recorded when the directory has no such file."""
        if not path or self.run_dir is None:
            return path
        here = Path(self.run_dir) / "checkpoints" / Path(path).name
        return str(here) if here.exists() else path

    def apply(self, event) -> dict:
        """Update from one event; returns its dict form."""
        e = _as_dict(event)
        kind = e.get("kind")
        self.activity = e.get("text", "") if kind == "progress" else ""
        if kind == "started":
            self.state = "running"
            self.background_weight = float((e.get("config") or {}).get("background_weight", 0.0))
            self.device = e.get("device_name") or e.get("device", "")
            self.classes = list(e.get("classes") or [])
            self.absent = [int(c) for c in e.get("absent_classes") or []]
            precision = e.get("precision")
            self.message = (
                f"Training on {self.device}: {e.get('train_images')} training, "
                f"{e.get('val_images')} validation images, {e.get('parameters', 0):,} parameters"
                + (f", {precision} ({e.get('precision_reason', '')})" if precision else "")
                # how batches are made and whether each step is replayed as a CUDA graph
                + (f"; {e['data']}" if e.get("data") else "")
            )
        elif kind == "step":
            self.steps.append(e["step"])
            self.losses.append(e["loss"])
            self.epoch = e["epoch"]
            self.progress = e.get("progress") or 0.0
            self.images_per_s = e.get("images_per_s") or 0.0
            self.eta_s = e.get("eta_s")
            self.cpu_note = cpu_share_text(e.get("cpu_cores"), e.get("threads"))
        elif kind == "validation":
            iou = [math.nan if v is None else float(v) for v in e["iou"]]
            self.val_steps.append(e["step"])
            self.val_iou.append(iou)
            miou, keras = e.get("miou"), e.get("miou_keras")
            self.val_miou.append(math.nan if miou is None else float(miou))
            self.val_miou_keras.append(math.nan if keras is None else float(keras))
            best = e.get("best_miou")
            self.best_miou = math.nan if best is None else float(best)
            self.latest_confusion = e.get("confusion")
            if "absent" in e:
                self.absent = [int(c) for c in e.get("absent") or []]
        elif kind == "data_update":
            self.corrected, self.excluded = e.get("corrected", 0), e.get("excluded", 0)
            self.newly_labelled = e.get("newly_labelled", 0)
            if e.get("absent_classes") is not None:
                self.absent = [int(c) for c in e["absent_classes"]]
        elif kind == "checkpoint":
            if e.get("which") == "best":
                self.best_checkpoint = self._in_run(e["path"])
            self.last_checkpoint = self._in_run(e["path"])
        elif kind == "finished":
            self.state = "finished"
            self.progress = 1.0
            best = e.get("best_miou")
            self.message = (
                f"Finished ({e.get('reason', 'completed')}): best mIoU {best:.3f}"
                if best is not None
                else "Finished"
            ) + (f"\n{e['note'][0].upper()}{e['note'][1:]}." if e.get("note") else "")
            self.best_checkpoint = self._in_run(e.get("best_checkpoint")) or self.best_checkpoint
        elif kind == "stopped":
            self.state = "stopped"
            self.message = "Stopped; checkpoint saved" + (
                f": {e['checkpoint']}" if e.get("checkpoint") else ""
            )
        elif kind == "failed":
            self.state = "failed"
            self.message = e.get("message", "failed")
            if e.get("last_good_checkpoint"):
                self.message += f"\nLast good checkpoint kept: {e['last_good_checkpoint']}"
        return e

    @property
    def latest_iou(self) -> list[float]:
        return self.val_iou[-1] if self.val_iou else [math.nan] * self.n_classes

    @property
    def n_classes(self) -> int:
        return len(self.classes) or 5

    def _best_index(self) -> int | None:
        if not self.val_iou:
            return None
        return int(np.nanargmax(np.where(np.isnan(self.val_miou), -1, self.val_miou)))

    @property
    def best_iou(self) -> list[float]:
        i = self._best_index()
        return [math.nan] * self.n_classes if i is None else self.val_iou[i]

    @property
    def best_miou_keras(self) -> float:
        """The Keras figure of the validation with the best mIoU (1-4)."""
        i = self._best_index()
        return math.nan if i is None else self.val_miou_keras[i]

    def progress_text(self) -> str:
        """What fits in the progress bar: how far, and how long to go."""
        eta = "?" if self.eta_s is None else _clock(self.eta_s)
        return f"{100 * min(max(self.progress, 0.0), 1.0):.0f}% · epoch {self.epoch + 1} · ETA {eta}"

    def status_line(self) -> str:
        if self.state not in ("running", "stopping"):
            return self.message
        eta = "?" if self.eta_s is None else _clock(self.eta_s)
        fixes = (
            f" · {self.corrected} corrected, {self.newly_labelled} newly labelled, {self.excluded} excluded"
            if self.corrected or self.excluded or self.newly_labelled
            else ""
        )
        if self.activity:
            return f"epoch {self.epoch + 1} · {self.activity}{fixes} · {self.device}"
        busy = f" · {self.cpu_note}" if self.cpu_note else ""
        return (
            f"epoch {self.epoch + 1} · {self.images_per_s:.1f} img/s · ETA {eta}{fixes} · {self.device}{busy}"
        )


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RunFollower:
    """Reads a run directory's new events as they are appended (attach to a run)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "events.jsonl").exists() and not (self.path / "config.toml").exists():
            raise FileNotFoundError(f"{self.path}: not a run directory (no events.jsonl or config.toml)")
        self.offset = 0
        self._partial = ""

    def new_events(self) -> list[dict]:
        file = self.path / "events.jsonl"
        if not file.exists():
            return []
        with open(file) as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def latest_preview(self) -> tuple[list[int], np.ndarray, np.ndarray | None] | None:
        path = self.path / "previews" / "latest.npz"
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                return z["indices"].tolist(), z["masks"], (z["entropy"] if "entropy" in z else None)
        except (OSError, ValueError, KeyError):
            return None  # being replaced right now; the next poll gets it
