"""Run directories: the config, every event as a JSON line, checkpoints, previews, a summary.

Layout::

    RUN/config.toml         the full configuration
    RUN/split.json          training and validation indices
    RUN/events.jsonl        one JSON event per line, as fit() yields them
    RUN/checkpoints/best.pt, RUN/checkpoints/last.pt
    RUN/previews/latest.npz the latest predicted preview masks (indices, masks, entropy)
    RUN/summary.json        written when the run ends

A run directory can be read while the run writes it (the GUI attaches this way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import TrainConfig, to_toml
from .events import Event, Preview


class RunDirError(OSError):
    """The run directory cannot be created or written."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / "best.pt"

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    def write_start(self, cfg: TrainConfig, train_idx, val_idx) -> None:
        (self.path / "config.toml").write_text(to_toml(cfg))
        split = {"train": [int(i) for i in train_idx], "val": [int(i) for i in val_idx]}
        _atomic_write(self.path / "split.json", json.dumps(split))

    def write_event(self, event: Event) -> None:
        if self._events is None:
            self._events = open(self.path / "events.jsonl", "a", buffering=1)  # noqa: SIM115 - kept open
        self._events.write(json.dumps(event.to_json()) + "\n")
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

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=1))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
