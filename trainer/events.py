"""Typed events yielded by ``fit()``: the one stream the CLI, the GUI and run directories read.

Child jobs other than training (prediction, the review audit) speak the same language:
``Progress`` while they work, then one result event (``Predicted``, ``Ranked``) or ``Failed``.
Training says ``Progress`` too while it validates frames read from disk, which can take
minutes where a step takes a second.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .metrics import nan_to_none


@dataclass
class Event:
    kind = "event"

    def to_json(self) -> dict:
        """A JSON-safe dict (arrays left out; NaN as null) with ``kind`` and a timestamp."""
        data = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        return {"kind": self.kind, "time": time.time(), **nan_to_none(data)}


@dataclass
class Started(Event):
    config: dict
    device: str
    device_name: str
    train_images: int
    val_images: int
    parameters: int
    world_size: int = 1
    resumed_from: str | None = None
    start_epoch: int = 0
    precision: str = "fp32"  # the autocast precision chosen once for the run: fp32 or bf16
    precision_reason: str = ""  # why: "auto: the CPU computes bf16 natively (avx512_bf16)"
    channels_last: bool = False
    data: str = (
        ""  # how batches are made: "whole images held in memory ...", "256x256 crops read from disk ..."
    )
    classes: list = field(default_factory=list)  # the dataset's class table: [{"id", "name", "color"}]
    absent_classes: list = field(default_factory=list)  # ids not in the training labels: never predicted
    kind = "started"


@dataclass
class Step(Event):
    epoch: int
    step: int
    loss: float
    lr: float
    images_per_s: float
    progress: float  # 0..1 of the planned run
    eta_s: float | None
    # CPU the training process used since the last Step, in cores (2.0: two cores busy),
    # against the threads it computes with; None on a GPU. Far below: other programs are busy.
    cpu_cores: float | None = None
    threads: int | None = None
    kind = "step"


@dataclass
class Validation(Event):
    epoch: int
    step: int
    iou: list  # one value per class id (NaN where a class is neither labelled nor predicted)
    miou: float
    pixel_accuracy: float
    confusion: list
    best_miou: float
    miou_keras: float = float("nan")  # what Keras MeanIoU(num_classes=5, ignore_class=0) prints
    images: int = 0  # validation images scored (excluded images are left out)
    train_loss: float | None = None  # mean training loss since the previous validation
    lr: float | None = None
    seconds: float = 0.0  # since the run (or this resumed part of it) started
    scored: list = field(default_factory=list)  # the ids the mIoU averages
    absent: list = field(default_factory=list)  # ids not in the training labels: never predicted
    left_out: dict = field(default_factory=dict)  # id -> why it is not in the mean
    kind = "validation"


@dataclass
class Preview(Event):
    epoch: int
    step: int
    indices: list
    masks: np.ndarray = field(repr=False)  # (K, H, W) uint8 predicted masks
    entropy: np.ndarray | None = field(default=None, repr=False)  # (K, H, W) float16
    kind = "preview"


@dataclass
class Checkpoint(Event):
    epoch: int
    step: int
    path: str
    which: str  # "best" or "last"
    miou: float | None
    kind = "checkpoint"


@dataclass
class DataUpdate(Event):
    """The training data changed: corrections and exclusions in use from this epoch on."""

    epoch: int
    corrected: int
    excluded: int
    train_images: int
    newly_labelled: int = 0  # unlabelled images given a label, now training images
    absent_classes: list | None = None  # the classes now left out of predictions, when that changed
    kind = "data_update"


@dataclass
class Finished(Event):
    epoch: int
    step: int
    best_miou: float
    best_checkpoint: str | None
    seconds: float
    reason: str = "completed"  # completed, time budget, early stopping
    note: str = ""  # what the person should know of how it ended (a budget too short to learn in)
    kind = "finished"


@dataclass
class Stopped(Event):
    epoch: int
    step: int
    checkpoint: str | None
    kind = "stopped"


@dataclass
class Failed(Event):
    message: str
    epoch: int = 0
    step: int = 0
    last_good_checkpoint: str | None = None
    kind = "failed"


@dataclass
class Progress(Event):
    """A child job's progress, or a training's between steps: ``done`` of ``total``
    units, and what it is doing."""

    text: str
    done: int = 0
    total: int = 0
    kind = "progress"


@dataclass
class Predicted(Event):
    """A prediction job's result: one mask (and entropy map) per image."""

    masks: np.ndarray = field(repr=False)  # (N, H, W) uint8
    entropy: np.ndarray | None = field(default=None, repr=False)  # (N, H, W) float16
    confidence: np.ndarray | None = field(default=None, repr=False)  # (N, H, W) float16, if asked
    kind = "predicted"


@dataclass
class PredictedOnDisk(Event):
    """A prediction of a dataset read from disk: the masks are in a zarr array at ``path``
    ((N, H, W) uint8, each frame at its own size inside the padded frame), with the scores
    of the labelled frames."""

    path: str
    image_miou: np.ndarray = field(repr=False)  # (N,) per-image mIoU, NaN where there is no label
    confusion: np.ndarray = field(repr=False)  # (5, 5) over the labelled frames
    kind = "predicted_on_disk"


@dataclass
class Ranked(Event):
    """The review audit's result: images most probably mislabelled first."""

    ranking: list = field(repr=False)  # [{"index", "score", "reasons": [...]}]
    # (N, H, W) uint8, out of fold; from disk {image: (h, w) mask} of the highest-scored images
    predictions: np.ndarray | dict | None = field(default=None, repr=False)
    kind = "ranked"


@dataclass
class Suggested(Event):
    """The label-next queue: unlabelled images most useful to label first."""

    ranking: list = field(repr=False)  # [{"index", "score", "reasons": [...]}], index into the pool
    kind = "suggested"


TERMINAL = (Finished, Stopped, Failed)
"""The events that end a training run."""
JOB_END = (*TERMINAL, Predicted, PredictedOnDisk, Ranked, Suggested)
"""The events that end any child job."""


LEARNING_STEPS = 100  # a run of fewer optimiser steps has barely begun to learn


def cpu_share_text(cores: float | None, threads: int | None) -> str:
    """ "training gets 0.2 of a core: other programs are busy" when the process used less
    than half the cores it computes with, else ""."""
    if cores is None or not threads or cores >= 0.5 * threads:
        return ""
    return f"training gets {cores:.1f} of {'a core' if threads == 1 else f'its {threads} cores'}: other programs are busy"
