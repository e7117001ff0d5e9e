"""The label-next loop without Qt: which unlabelled images to label first, and a start
from the model's own prediction.

The queue comes from ``trainer.suggest`` run in a child process with the current
checkpoint (the running training's, or an opened run's). "Start from prediction" puts
the model's mask for the image on screen into the masks array as an unsaved edit,
keeping only the pixels whose predicted class reaches ``confidence`` (the rest stays
background, "not labelled", for the person to paint); saving it makes the image a
training image, picked up by a running training at its next epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from psygnal import Signal

from trainer import events as ev
from trainer.inference import LABEL_CONFIDENCE, keep_confident
from trainer.suggest import describe

from ._stack import is_stack

QUEUE_TOP = 100


@dataclass(frozen=True)
class NextEntry:
    """One unlabelled image of the label-next queue and why it is there."""

    row: int  # the image's row in the browsed stack
    score: float
    text: str  # every reason, for the tooltip
    short: str = ""  # the headline, for the list

    @property
    def label(self) -> str:
        return self.line()

    def line(self, name: str = "") -> str:
        """The queue's line, with the image's file name where it has one."""
        return f"image {self.row:>5}{f' ({name})' if name else ''} · {self.score:.2f} · {self.short or self.text}"

    @classmethod
    def from_ranking(cls, row: int, entry: dict) -> NextEntry:
        unc = next((r for r in entry["reasons"] if r["kind"] == "uncertain"), None)
        short = f"{unc['regions']} region(s), {100 * unc['share']:.0f}% uncertain" if unc else ""
        return cls(row, float(entry["score"]), describe(entry), short)


class LabelNextModel:
    """Signals: ``queue_changed()``, ``progress(str)``, ``done(bool)``, ``notify(str, str)``."""

    queue_changed = Signal()
    progress = Signal(str)
    done = Signal(bool)
    notify = Signal(str, str)

    def __init__(self, browser, review, training) -> None:
        self.browser, self.review, self.training = browser, review, training
        self.entries: list[NextEntry] = []
        self.confidence = LABEL_CONFIDENCE
        self.job = None
        self.rows = np.zeros(0, np.int64)
        self.seed: tuple[int, object] | None = None  # (row, its PredictionProcess)

    def _checkpoint(self) -> str | None:
        checkpoint = self.training.checkpoint
        if not checkpoint:
            self.notify.emit("No checkpoint yet: train first (Train tab), or open a run.", "error")
        return checkpoint

    # -- the queue -----------------------------------------------------------------
    def _images(self, *row_sets):
        """The images of each set of rows: arrays of a dataset held in memory; for one read
        from disk, its frames by row, read (at their own sizes) as the child scores them."""
        if self.browser.masks is not None and is_stack(self.browser.masks):
            from trainer.formats import open_zarr
            from trainer.suggest import FramesOf

            stored = open_zarr(self.browser.source)
            return [FramesOf(stored, rows) for rows in row_sets]
        images = np.asarray(self.review.images, dtype=np.uint8)
        return [images[rows] for rows in row_sets]

    def start(self, top: int = QUEUE_TOP):
        """Rank the unlabelled images with the current checkpoint, in a child process."""
        from trainer.process import SuggestProcess

        b = self.browser
        if self.job is not None or not self.review.active:
            return None
        excluded = self.review.excluded()
        left_out = b.pool_labelled | excluded  # labelled since, or excluded
        rows = np.array([i for i in range(b.n_labelled, len(b)) if i not in left_out], np.int64)
        if not len(rows):
            self.notify.emit("There are no unlabelled images to rank.", "info")
            return None
        checkpoint = self._checkpoint()
        if not checkpoint:
            return None
        known = np.array([i for i in b.labelled_rows() if i not in excluded], np.int64)
        pool, labelled = self._images(rows, known)
        self.rows = rows
        self.job = SuggestProcess(pool, labelled if len(labelled) else None, checkpoint, top)
        self.progress.emit(f"Scoring {len(rows)} unlabelled images…")
        return self.job

    def go_to(self, entry: NextEntry) -> None:
        if self.browser.show == "labelled" and self.browser.is_unlabelled(entry.row):
            self.browser.set_show("unlabelled")  # Next and Prev then stay among them
        self.browser.set_index(entry.row)

    # -- a start from the prediction --------------------------------------------------
    def start_from_prediction(self, row: int | None = None):
        """Predict the image (flip-averaged) and put the confident part into its mask."""
        from trainer.process import DatasetSpec, PredictionProcess

        row = self.browser.index if row is None else row
        if not self.review.active or self.seed is not None:
            return None
        if not self.browser.is_unlabelled(row):
            self.notify.emit(
                "This image has a label already; the prediction starts unlabelled images.", "info"
            )
            return None
        checkpoint = self._checkpoint()
        if not checkpoint:
            return None
        image = np.asarray(self.review.images[row], dtype=np.uint8)[None]
        spec = DatasetSpec(
            images=image,
            masks=np.zeros_like(image),
            source="label next",
            classes=self.browser.classes.records(),
        )
        self.seed = (row, PredictionProcess(spec, checkpoint, batch_size=1, confidence=True))
        self.progress.emit(f"Predicting image {row}…")
        return self.seed[1]

    def _take_seed(self, row: int, e: ev.Predicted) -> None:
        mask = keep_confident(e.masks, e.confidence, self.confidence)[0]
        if not self.browser.is_unlabelled(row) or self.review.has_unsaved_edits(row):
            self.notify.emit(f"Image {row} changed meanwhile; its prediction was not put in.", "info")
            return
        self.review.propose(row, mask)
        kept = float((mask > 0).mean())
        self.progress.emit(
            f"Image {row}: the model's classes on {100 * kept:.0f}% of the pixels (confidence >= "
            f"{self.confidence:.2f}); paint the rest, then save (Alt-S)."
        )

    # -- following the jobs ---------------------------------------------------------------
    def poll(self) -> None:
        if self.job is not None:
            for e in self.job.events():
                if isinstance(e, ev.Progress):
                    self.progress.emit(e.text)
                elif isinstance(e, ev.Suggested):
                    self.entries = [NextEntry.from_ranking(int(self.rows[r["index"]]), r) for r in e.ranking]
                    self.queue_changed.emit()
                    self.progress.emit(f"Ranked {len(self.rows)} unlabelled images; the most useful first.")
                    self.done.emit(True)
                elif isinstance(e, ev.Failed):
                    self.notify.emit(
                        f"Ranking unlabelled images failed: {e.message.splitlines()[0]}", "error"
                    )
                    self.done.emit(False)
            if self.job.finished:
                self.job = None
        if self.seed is not None:
            row, job = self.seed
            for e in job.events():
                if isinstance(e, ev.Predicted):
                    self._take_seed(row, e)
                elif isinstance(e, ev.Failed):
                    self.notify.emit(f"Prediction failed: {e.message.splitlines()[0]}", "error")
            if job.finished:
                self.seed = None

    def dataset_changed(self) -> None:
        """Another dataset is open: a ranking or a start from prediction still running
        was computed for the one before, and its rows mean other images here."""
        running = self.job is not None or self.seed is not None
        self.shutdown()
        self.entries, self.rows = [], np.zeros(0, np.int64)
        self.queue_changed.emit()
        if running:
            self.progress.emit("Ranking stopped: another dataset was opened.")
            self.done.emit(False)

    def jobs(self) -> list:
        return [j for j in (self.job,) if j is not None and j.running]

    def shutdown(self) -> None:
        for job in (self.job, self.seed[1] if self.seed else None):
            if job is not None:
                job.kill()
        self.job = self.seed = None
