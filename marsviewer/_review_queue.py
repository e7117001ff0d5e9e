"""The review queue and the audit job that ranks it: a mixin of :class:`ReviewModel`
(its state and signals: ``masks``, ``store``, ``queue``, ``queue_changed`` ...)."""

from __future__ import annotations

import numpy as np

from trainer import events as ev
from trainer.audit import move_mask, rank

from ._review_entries import QueueEntry
from ._stack import is_stack, overlay_like

DISAGREEMENT = "model disagrees"
QUEUE_MIN_SCORE = 0.05
QUEUE_MAX = 500


class ReviewQueue:
    """Rank, visit and act on the queue; run the out-of-fold audit in a child."""

    def rerank(self, ranking: list[dict] | None = None) -> None:
        """Rank by duplicate masks now (or take an audit's ranking) and refill the queue."""
        if ranking is None and self.reads_from_disk():
            ranking = []  # read from disk: duplicate masks are found by the audit (Rank)
        if ranking is None:
            ranking = rank(
                np.asarray(self.masks[: self.n_labelled], dtype=np.uint8), None, None, self.excluded()
            )
        shown = [r for r in ranking if r["score"] > QUEUE_MIN_SCORE][:QUEUE_MAX]
        self.queue = [QueueEntry.from_ranking(r) for r in shown]
        self.queue_changed.emit()

    def go_to(self, entry: QueueEntry) -> None:
        self.browser.set_index(entry.index)
        predicted = self._audit_mask(entry.index)
        if predicted is not None:
            self.disagreement = overlay_like(self.disagreement, self.masks)
            mask = np.asarray(self.masks[entry.index])
            h, w = predicted.shape
            shown = np.zeros(mask.shape, bool)  # a frame of a stack: its own size inside the padded one
            shown[:h, :w] = predicted != mask[:h, :w]
            self.disagreement[entry.index] = shown
            self.overlay_changed.emit(DISAGREEMENT, entry.index)

    def _audit_mask(self, i: int) -> np.ndarray | None:
        """The audit's predicted mask of image ``i``: from the arrays of every image, or
        (a dataset read from disk) those kept for the highest-scored ones."""
        masks = self.audit_masks
        if isinstance(masks, dict):
            return masks.get(i)
        return masks[i] if masks is not None and i < len(masks) else None

    def exclude_group(self, entry: QueueEntry | None) -> None:
        if entry is None or not self.active:
            return
        if entry.group is None:
            self.notify.emit("This entry is not part of a duplicate-mask group.", "info")
            return
        self.store.exclude_many(entry.group, note="duplicate-mask group")
        self.notify.emit(f"Excluded {len(entry.group)} images from training.", "info")
        self._emit_state(self.browser.index)

    def apply_move(self, entry: QueueEntry | None) -> None:
        """Move the entry's mask as its "misaligned" reason suggests: an unsaved edit,
        to be checked and saved like any other."""
        if entry is None or not self.active:
            return
        if entry.move is None:
            self.notify.emit("The model does not suggest moving this mask.", "info")
            return
        self.browser.set_index(entry.index)
        self.propose(entry.index, move_mask(np.asarray(self.masks[entry.index]), *entry.move))

    def propose(self, i: int, mask: np.ndarray) -> None:
        """Put ``mask`` into image ``i`` as an unsaved edit, for the person to check and save."""
        self.masks[i] = mask
        self.masks_changed.emit([i])
        self._emit_state(i)

    # -- the audit job -------------------------------------------------------------
    def reads_from_disk(self) -> bool:
        """Whether the dataset is read from disk a frame at a time (then duplicate masks
        too wait for the audit: finding them reads every mask)."""
        return self.masks is not None and is_stack(self.masks)

    def start_audit(self, minutes: float, folds: int = 3):
        """Rank the labelled images in a child process: from the arrays of a dataset held
        in memory (unsaved edits included), or a dataset read from disk by its path, with
        the corrections saved in its store (the child reads it a frame at a time)."""
        from trainer.process import AuditProcess

        if not self.active or self.auditor is not None:
            return None
        n = self.n_labelled
        if self.reads_from_disk():  # the child reads the store too: no mask decompressed here
            self.auditor = AuditProcess.of_stored(self.training_data(), minutes, folds)
        else:
            excluded = {i for i in self.excluded() if i < n}
            masks = np.asarray(self.masks[:n], dtype=np.uint8).copy()
            self.auditor = AuditProcess(
                np.asarray(self.images[:n], dtype=np.uint8), masks, excluded, minutes, folds,
                self.browser.classes.records(),
            )  # fmt: skip
        self.audit_progress.emit(f"Training {folds} out-of-fold models ({minutes:g} min of compute)…")
        return self.auditor

    def poll(self) -> None:
        if self.auditor is None:
            return
        for e in self.auditor.events():
            if isinstance(e, ev.Progress):
                self.audit_progress.emit(e.text)
            elif isinstance(e, ev.Ranked):
                self.audit_masks = e.predictions
                self.rerank(e.ranking)
                self.audit_progress.emit(
                    f"Ranked {len(e.ranking)} images. Click an entry to see it"
                    + (
                        "; pink = the model disagrees."
                        if e.predictions is not None and len(e.predictions)
                        else "."
                    )
                )
                self._end_audit(True)
                return
            elif isinstance(e, ev.Failed):
                self.audit_progress.emit(f"Ranking failed: {e.message}")
                self.notify.emit(f"Ranking failed: {e.message.splitlines()[0]}", "error")
                self._end_audit(False)
                return

    def _end_audit(self, ok: bool) -> None:
        self.auditor = None
        self.audit_done.emit(ok)

    def jobs(self) -> list:
        return [self.auditor] if self.auditor is not None else []
