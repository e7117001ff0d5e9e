"""Qt-free review state: corrections saved with history, exclusions, and the review queue.

``ReviewModel`` edits the masks array the viewer shows (napari paints into the same
array) and keeps the corrections store in step with it. Panels call its methods and
redraw on its signals; tests drive it without Qt.
"""

from __future__ import annotations

import time

import numpy as np
from psygnal import Signal

from trainer.corrections import (
    CorrectionsError,
    CorrectionStore,
    dataset_hash,
    default_store_path,
    keyed_by_name,
    row_keys,
)

from ._review_entries import ImageReview, QueueEntry
from ._review_queue import DISAGREEMENT, ReviewQueue
from ._stack import CorrectedFrames, FrameStack, is_stack, overlay_like

__all__ = ["CHANGED", "DISAGREEMENT", "ImageReview", "QueueEntry", "ReviewModel"]

CHANGED = "changed pixels"


class ReviewModel(ReviewQueue):
    """Corrections and the review queue of one dataset.

    Signals
    -------
    image_changed(ImageReview)  the current image's review state changed
    masks_changed(list)         these rows of the masks array were rewritten
    overlay_changed(str, int)   an overlay (CHANGED or DISAGREEMENT) changed at an image
    queue_changed()             the review queue was re-ranked
    audit_progress(str)         the ranking job says where it is
    audit_done(bool)            the ranking job ended (True: with a result)
    saved(int)                  an image's mask was saved
    notify(str, str)            a message for the person (text, "info" or "error")
    """

    image_changed = Signal(object)
    masks_changed = Signal(list)
    overlay_changed = Signal(str, int)
    queue_changed = Signal()
    audit_progress = Signal(str)
    audit_done = Signal(bool)
    saved = Signal(int)
    notify = Signal(str, str)

    def __init__(self, browser, training_data=None) -> None:
        self.browser = browser
        self.training_data = training_data  # () -> the DatasetSpec a child job reads the dataset by
        self.store: CorrectionStore | None = None
        self.n_labelled = 0  # rows from here on are unlabelled images
        self.masks: np.ndarray | None = None  # the live array the viewer paints into
        self.images: np.ndarray | None = None
        self.original_masks: np.ndarray | None = None
        self.content_hash = ""
        self.autosave = False
        self.queue: list[QueueEntry] = []
        self.audit_masks: np.ndarray | None = None  # out-of-fold predictions of the last audit
        self.changed: np.ndarray | None = None  # overlay arrays, created on first use
        self.disagreement: np.ndarray | None = None
        self.auditor = None
        self._shown = 0
        browser.index_changed.connect(self._on_index)

    # -- the dataset -------------------------------------------------------------
    def attach(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        source: str,
        n_labelled: int | None = None,
        keys: list[str] | None = None,
    ) -> None:
        """Open (or create) the dataset's store and apply its corrections to ``masks``.
        Rows from ``n_labelled`` on are unlabelled images: a mask saved there labels them.
        ``keys`` (one per row: the images' names) let a folder or zarr dataset's store
        find its images again after images were added; without them rows are positions."""
        self.detach()
        self._attached = (images, masks, source, n_labelled, keys)
        self.images, self.masks = images, masks
        self.n_labelled = n = len(masks) if n_labelled is None else n_labelled
        self.changed = self.disagreement = self.audit_masks = None
        pool = len(masks) - n
        by_name = keys is not None and keyed_by_name(source)
        if is_stack(masks):  # on disk: the originals are read from there, nothing is hashed
            stored = masks.base.masks if isinstance(masks.base, CorrectedFrames) else masks.base
            self.original_masks = FrameStack(masks.shape, base=stored, sizes=masks.sizes)
            self.content_hash, shape, by_name = None, [tuple(s) for s in masks.sizes], True
        else:
            self.original_masks = np.array(masks, dtype=np.uint8, copy=True)
            self.content_hash = dataset_hash(np.asarray(images[:n]), self.original_masks[:n])
            shape = masks.shape[1:]
        try:
            keys = list(keys) if keys is not None else row_keys(range(n), range(pool))
            path = default_store_path(source, self.content_hash)
            self.store = CorrectionStore(
                path, self.content_hash, n, shape, n_pool=pool, keys=keys, by_name=by_name
            )
        except (CorrectionsError, OSError, ValueError) as exc:
            self.store = None
            self.notify.emit(f"Corrections are off for this dataset: {exc}", "error")
            return
        if is_stack(masks):  # saved masks are read from the store when shown, not held
            edited, excluded = self.store.edited(), self.store.excluded()
            masks.rebase(CorrectedFrames(self.original_masks.base, self.store, masks.shape), edited)
        else:
            edited, excluded = self.store.snapshot()
            for i, m in edited.items():
                masks[i] = m
        self.browser.set_pool_labelled(i for i in edited if i >= n)
        if edited:
            self.masks_changed.emit(sorted(edited))
        self.rerank()
        self._shown = self.browser.index
        self._emit_state(self.browser.index)
        if edited or excluded:
            earlier = (
                " The sample keeps what was saved in earlier sessions; Review > Start afresh sets it aside."
                if source.startswith("synthetic")
                else ""
            )
            self.notify.emit(
                f"Applied {len(edited)} saved correction(s); {len(excluded)} image(s) excluded ({path}).{earlier}",
                "info",
            )
        self._report_lost()

    def _report_lost(self) -> None:
        """Corrections the dataset cannot take: images gone from it, or resized since."""
        orphans, misfits = self.store.orphans(), sorted(self.store.misfits)
        if orphans:
            self.notify.emit(
                f"{len(orphans)} corrected image(s) are no longer in this dataset "
                f"({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}); their corrections "
                "are kept and come back with the images.",
                "info",
            )
        if misfits:
            self.notify.emit(
                f"{len(misfits)} image(s) changed size since their masks were saved "
                f"({', '.join(misfits[:3])}); their original masks are shown.",
                "error",
            )

    @property
    def is_sample(self) -> bool:
        """The built-in synthetic sample is open (the only dataset that can start afresh
        from the panel: a person's own corrections are set aside by hand, on purpose)."""
        attached = getattr(self, "_attached", None)
        return self.active and attached is not None and str(attached[2]).startswith("synthetic")

    def start_afresh(self) -> str | None:
        """The sample only: set its corrections aside (their folder renamed ``.replaced-TIME``,
        nothing deleted) and show its original masks with a new, empty store. Returns where
        the corrections went (None: nothing to set aside)."""
        from trainer.store_location import set_aside

        if not self.active or not self.is_sample:
            return None
        attached, original, folder = self._attached, self.original_masks, self.store.path.parent
        self.detach()
        moved = set_aside(folder)
        attached[1][...] = original  # the file's masks again, in the array the viewer shows
        self.attach(*attached)
        self.browser.set_pool_labelled([])
        self.browser.refresh_stats()
        self.masks_changed.emit(list(range(len(self.masks))))
        self.notify.emit(f"Started afresh: the corrections saved before are kept in {moved}.", "info")
        return moved

    def detach(self) -> None:
        """Let go of the dataset: its store, its queue, and a ranking still running for it
        (its result would land on the next dataset's queue)."""
        if self.auditor is not None:
            self.auditor.kill()
            self.audit_progress.emit("Ranking stopped: another dataset was opened.")
            self._end_audit(False)
        if self.store is not None:
            self.store.close()
        self.store = None
        self.masks = self.original_masks = None
        self.queue = []
        self.audit_masks = self.disagreement = self.changed = None

    @property
    def active(self) -> bool:
        return self.store is not None and self.masks is not None

    def excluded(self) -> set[int]:
        return self.store.excluded() if self.store is not None else set()

    # -- one image ---------------------------------------------------------------
    def _padded(self, i: int, mask: np.ndarray) -> np.ndarray:
        """A stored mask (a frame's own size) as the viewer's frame (padded to the stack's)."""
        return self.masks.padded(i, mask) if is_stack(self.masks) else mask

    def _effective(self, i: int) -> np.ndarray:
        mask = self.store.state(i)[0]
        return self.original_masks[i] if mask is None else self._padded(i, mask)

    def _shows_effective(self, i: int) -> bool:
        """Frame ``i`` of a stack read from disk that nothing was painted into: it is what
        the store gives (the stack's base is the corrected frames), so nothing needs to be
        read and compared to know it."""
        return is_stack(self.masks) and not self.masks.is_written(i)

    def has_unsaved_edits(self, i: int) -> bool:
        if not self.active or self._shows_effective(i):
            return False
        return not np.array_equal(self.masks[i], self._effective(i))

    def state_of(self, i: int) -> ImageReview:
        mask, excluded = self.store.state(i)
        entries = self.store.history(i)
        history = tuple(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.time))}  {e.action}"
            f"{'  ' + e.note if e.note else ''}{'  ◀' if e.current else ''}"
            for e in entries
        )
        if entries:  # where Undo leads back to: the file's mask, marked when it is what is in effect
            start = (
                "unlabelled (as in the file)" if i >= self.n_labelled else "original mask (as in the file)"
            )
            history = (start + ("" if any(e.current for e in entries) else "  ◀"), *history)
        if mask is None and self._shows_effective(i):  # the original itself: browsing reads one mask
            changed = 0
        else:
            changed = int((self.masks[i] != self.original_masks[i]).sum())
        return ImageReview(i, mask is not None, excluded, self.has_unsaved_edits(i), changed, history)

    def save(self, i: int | None = None, note: str = "") -> bool:
        if not self.active:
            return False
        i = self.browser.index if i is None else i
        mask = np.asarray(self.masks[i], dtype=np.uint8)
        if mask.max(initial=0) > 4:
            self.notify.emit(
                f"Image {i}: label {int(mask.max())} is not a class (0..4); fix it before saving.", "error"
            )
            return False
        if i >= self.n_labelled and not mask.any():
            self.notify.emit(
                f"Image {i} is not saved: no pixel of it is labelled, and saved it would become a "
                "training image that teaches nothing. Paint at least one class first.",
                "error",
            )
            return False
        if is_stack(self.masks):
            self.store.save_mask(i, self.masks.own_size(i, mask), note)
            self.masks.forget(i)  # read back from the store: an edit saved is not held
        else:
            self.store.save_mask(i, mask, note)
        self._sync_pool(i)
        self._emit_state(i)
        self.saved.emit(i)
        return True

    def _sync_pool(self, i: int) -> None:
        """An unlabelled image with a saved mask counts as labelled (balance, filters)."""
        if i >= self.n_labelled:
            labelled = self.store.state(i)[0] is not None
            if labelled != (i in self.browser.pool_labelled):
                self.browser.set_pool_labelled(self.browser.pool_labelled ^ {i})

    def _rewrite(self, i: int) -> None:
        if is_stack(self.masks):
            self.masks.forget(i)  # its base reads the effective mask: nothing held
        else:
            self.masks[i] = self._effective(i)
        self._sync_pool(i)
        self.masks_changed.emit([i])
        self._emit_state(i)

    def undo(self) -> None:
        i = self.browser.index
        if self.active and self.store.undo(i):
            self._rewrite(i)

    def redo(self) -> None:
        i = self.browser.index
        if self.active and self.store.redo(i):
            self._rewrite(i)

    def restore(self) -> None:
        if self.active:
            self.store.restore(self.browser.index)
            self._rewrite(self.browser.index)

    def toggle_exclude(self) -> None:
        i = self.browser.index
        if not self.active:
            return
        if i >= self.n_labelled and i not in self.browser.pool_labelled:
            self.notify.emit("An unlabelled image trains only once it has a saved label.", "info")
            return
        if self.store.is_excluded(i):
            self.store.include(i)
        else:
            self.store.exclude(i)
        self._emit_state(i)

    def mask_edited(self) -> None:
        """The person painted on the current image (napari wrote into ``masks``)."""
        if self.active:
            self._emit_state(self.browser.index)

    def shutdown(self) -> None:
        if self.auditor is not None:
            self.auditor.kill()
            self.auditor = None
        self.detach()

    # -- following the browser -------------------------------------------------------
    def _on_index(self, i: int) -> None:
        previous, self._shown = self._shown, i
        if not self.active:
            return
        if self.autosave and previous != i and 0 <= previous < len(self.masks):
            if self.has_unsaved_edits(previous):
                self.save(previous, note="autosave")
        self._emit_state(i)

    def _emit_state(self, i: int) -> None:
        state = self.state_of(i)
        if state.changed_pixels or self.changed is not None:
            self.changed = overlay_like(self.changed, self.masks)
            self.changed[i] = self.masks[i] != self.original_masks[i]
            self.overlay_changed.emit(CHANGED, i)
        self.image_changed.emit(state)
