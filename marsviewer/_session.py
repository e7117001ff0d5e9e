"""The plugin's composition root, without Qt: one ``Session`` per main widget.

It owns the dataset being browsed (``browser``), its corrections and review queue
(``review``), training, prediction and the runs (``training``), the label-next queue of
unlabelled images (``label_next``), and the child jobs they start. Panels forward user actions to it in one line each and redraw on its signals;
nothing here imports Qt or napari, so its behaviour is tested with plain pytest.

Training yields to the person at the screen: every interaction (a browse step, a paint
stroke) calls :meth:`Session.user_active`, which suspends the child jobs at once; they go
on by themselves once the viewer has been quiet for ``QUIET_S`` (checked by ``poll``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from psygnal import Signal

from trainer.config import ConfigError

from ._browser import DatasetBrowser
from ._label_next_model import LabelNextModel
from ._review_model import ReviewModel
from ._stack import is_stack
from ._training_model import TrainingModel

QUIET_S = 0.15
"""After a person's last interaction, child jobs stay held this long. Browsing at a
step every 0.5 s, training keeps more than half its speed; a step's repaint (~50 ms
here) never shares the cores with training."""


class Session:
    """Dataset, corrections, training and jobs of one main widget.

    Signals
    -------
    dataset_changed()   a dataset was opened or closed (``browser`` says which)
    notify(str, str)    a message for the person: text and "info" or "error"
    """

    dataset_changed = Signal()
    notify = Signal(str, str)

    def __init__(self, runs_root: str | Path | None = None, clock=time.monotonic) -> None:
        self.browser = DatasetBrowser()
        self.review = ReviewModel(self.browser, self.training_data)
        self.training = TrainingModel(self.browser, self.training_data, runs_root)
        self.label_next = LabelNextModel(self.browser, self.review, self.training)
        self.images: np.ndarray | None = None
        self.clock = clock
        self.quiet_at = 0.0
        self.held: list = []
        for model in (self.review, self.training, self.label_next):
            model.notify.connect(self.notify.emit)

    # -- the dataset ---------------------------------------------------------------------
    def set_dataset(
        self, images, masks, names=None, source: str = "", n_test: int = 0, keys=None, classes=None
    ) -> None:
        """Browse these arrays. ``masks`` is the array the viewer shows and paints into:
        saved corrections are written into it, and edits in it are what gets saved. Its
        last ``n_test`` rows are unlabelled images (all background until labelled).
        ``keys``: how the corrections store finds each row again (the images' names).
        ``classes``: the dataset's class table (default: the competition's)."""
        self.images = images
        self.label_next.dataset_changed()  # its jobs and queue were the last dataset's
        self.browser.set_dataset(masks, names, source, n_test, classes)
        if images is not None and np.shape(images) == np.shape(masks):
            self.review.attach(images, masks, source, len(masks) - n_test, keys)
            if self.review.active and self.review.store.edited():
                self.browser.refresh_stats()  # corrections were applied to the masks
        self.training.set_frames(masks)
        self.dataset_changed.emit()

    def clear(self) -> None:
        self.label_next.dataset_changed()
        self.review.detach()
        self.images = None
        self.browser.clear()
        self.training.set_frames(None)
        self.dataset_changed.emit()

    def training_data(self):
        """The data a run trains on: the original masks plus the *saved* corrections,
        which the training re-reads every epoch (unsaved paint strokes are not used)."""
        from trainer.process import DatasetSpec

        if self.images is None or not self.browser.loaded:
            raise ConfigError("open a dataset first (Dataset tab)")
        n = self.browser.n_labelled
        review = self.review
        if is_stack(self.browser.masks):  # a zarr dataset on disk: the child reads it there too
            return DatasetSpec(
                path=self.browser.source, lazy=True, source=self.browser.source,
                corrections_path=str(review.store.path) if review.active else None,
                corrections_keys=review.store.keys if review.active else None,
            )  # fmt: skip
        images = np.asarray(self.images, dtype=np.uint8)
        pool = images[n:] if len(images) > n else None
        classes = self.browser.classes.records()
        if review.active:
            return DatasetSpec(
                images=images[:n], masks=review.original_masks[:n], pool=pool, source=self.browser.source,
                corrections_path=str(review.store.path), corrections_keys=review.store.keys, classes=classes,
            )  # fmt: skip
        return DatasetSpec(
            images=images[:n], masks=np.asarray(self.browser.masks[:n], np.uint8), source=self.browser.source,
            classes=classes,
        )  # fmt: skip

    # -- child jobs and the person at the screen --------------------------------------------
    def jobs(self) -> list:
        return self.training.jobs() + self.review.jobs() + self.label_next.jobs()

    def user_active(self) -> None:
        """The person browsed, painted or moved the view: hold every child job until the
        viewer has been quiet for ``QUIET_S``."""
        self.quiet_at = self.clock() + QUIET_S
        self.training.last_hold = self.training.clock()
        for job in self.jobs():
            job.hold(QUIET_S)
            if job not in self.held:
                self.held.append(job)

    @property
    def holding(self) -> bool:
        return bool(self.held)

    def poll(self) -> None:
        """Called every few tens of ms by the widget: release held jobs once the viewer is
        quiet, then read what every job sent (never waits)."""
        if self.held and self.clock() >= self.quiet_at:
            self._release_held()
        self.training.poll()
        self.review.poll()
        self.label_next.poll()

    def _release_held(self) -> None:
        for job in self.held:
            job.release()
        self.held = []

    def shutdown(self) -> None:
        """Stop everything this session started (napari is closing)."""
        self._release_held()
        self.label_next.shutdown()
        self.review.shutdown()
        self.training.shutdown()
