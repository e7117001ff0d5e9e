"""The review panel: fix masks with napari's paint tools, save them to the corrections
store (with undo/redo/restore), exclude images, and work through a ranked review queue."""

from __future__ import annotations

import time

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from trainer.corrections import CorrectionsError, CorrectionStore, dataset_hash, default_store_path

DIFF = "changed pixels"
DISAGREEMENT = "model disagrees"


class ReviewPanel(QWidget):
    saved = Signal(int)
    audit_done = Signal()

    def __init__(self, owner, parent=None) -> None:
        super().__init__(parent)
        self.owner = owner
        self.viewer = owner.viewer
        self.store: CorrectionStore | None = None
        self.original_masks: np.ndarray | None = None
        self.content_hash = ""
        self.ranking: list[dict] = []
        self.audit_pred: np.ndarray | None = None
        self._auditor = None
        self._shown_index = 0
        self._build()
        self.timer = QTimer(self)
        self.timer.setInterval(200)
        self.timer.timeout.connect(self._poll_audit)
        owner.browser.index_changed.connect(self._on_index)

    def _build(self) -> None:
        root = QVBoxLayout(self)
        box = QGroupBox("This image")
        lay = QVBoxLayout(box)
        self.state_label = QLabel("No dataset.")
        self.state_label.setWordWrap(True)
        lay.addWidget(self.state_label)
        hint = QLabel("Paint on the masks layer with napari's brush, fill and eraser, then Save.")
        hint.setWordWrap(True)
        lay.addWidget(hint)
        row = QHBoxLayout()
        self.save_button = QPushButton("Save")
        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        self.restore_button = QPushButton("Restore original")
        for b in (self.save_button, self.undo_button, self.redo_button, self.restore_button):
            row.addWidget(b)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.exclude_button = QPushButton("Exclude from training")
        self.autosave = QCheckBox("autosave when moving")
        row.addWidget(self.exclude_button)
        row.addWidget(self.autosave)
        lay.addLayout(row)
        self.history_list = QListWidget()
        self.history_list.setMaximumHeight(100)
        lay.addWidget(QLabel("History (◀ = current):"))
        lay.addWidget(self.history_list)
        root.addWidget(box)
        self.save_button.clicked.connect(lambda: self.save())
        self.undo_button.clicked.connect(lambda: self.undo())
        self.redo_button.clicked.connect(lambda: self.redo())
        self.restore_button.clicked.connect(lambda: self.restore())
        self.exclude_button.clicked.connect(lambda: self.toggle_exclude())

        box = QGroupBox("Review queue: masks that are probably wrong")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.audit_button = QPushButton("Rank images")
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 120)
        self.minutes_spin.setValue(3.0)
        self.minutes_spin.setSuffix(" min")
        self.minutes_spin.setToolTip("training budget of the out-of-fold models that look for disagreement")
        row.addWidget(self.audit_button)
        row.addWidget(self.minutes_spin)
        lay.addLayout(row)
        self.audit_status = QLabel(
            "Duplicate masks are ranked at once; model disagreement needs a short training."
        )
        self.audit_status.setWordWrap(True)
        lay.addWidget(self.audit_status)
        self.queue = QListWidget()
        self.queue.setMinimumHeight(160)
        self.queue.itemClicked.connect(self._on_queue_clicked)
        lay.addWidget(self.queue)
        row = QHBoxLayout()
        self.exclude_group_button = QPushButton("Exclude this duplicate group")
        self.exclude_group_button.setToolTip(
            "exclude every image of the selected duplicate-mask group from training"
        )
        self.exclude_group_button.clicked.connect(self.exclude_selected_group)
        self.move_button = QPushButton("Apply suggested move")
        self.move_button.setToolTip(
            "move a misaligned mask back to where the model says it belongs (unsaved: check, then Save)"
        )
        self.move_button.clicked.connect(self.apply_suggested_move)
        row.addWidget(self.exclude_group_button)
        row.addWidget(self.move_button)
        lay.addLayout(row)
        root.addWidget(box)
        root.addStretch(1)
        self.audit_button.clicked.connect(lambda: self.start_audit())

    # -- dataset ---------------------------------------------------------------
    def attach_dataset(self, images: np.ndarray, masks_layer, source: str) -> None:
        """Open (or create) the store of this dataset and apply its corrections to the layer."""
        self.original_masks = np.array(masks_layer.data, dtype=np.uint8, copy=True)
        self.content_hash = dataset_hash(np.asarray(images), self.original_masks)
        if self.store is not None:
            self.store.close()
        try:
            path = default_store_path(source, self.content_hash)
            self.store = CorrectionStore(
                path, self.content_hash, len(self.original_masks), self.original_masks.shape[1:]
            )
        except (CorrectionsError, OSError) as exc:
            self.store = None
            show_error(f"Corrections are off for this dataset: {exc}")
            return
        # napari emits "paint" just before it writes the stroke: look once it has.
        masks_layer.events.paint.connect(lambda _e=None: QTimer.singleShot(0, self._after_paint))
        edited, excluded = self.store.snapshot()
        for i, m in edited.items():
            masks_layer.data[i] = m
        if edited:
            masks_layer.refresh()
            self.owner.browser.refresh_stats()
        self.ranking = self._quick_ranking()
        self._fill_queue()
        self._on_index(self.owner.browser.index)
        if edited or excluded:
            show_info(
                f"Applied {len(edited)} saved correction(s); {len(excluded)} image(s) excluded ({path})."
            )

    def detach(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = None
        self.original_masks = None

    # -- editing ---------------------------------------------------------------
    def _layer_mask(self, i: int) -> np.ndarray:
        return np.asarray(self.owner.masks_layer.data[i], dtype=np.uint8)

    def _effective(self, i: int) -> np.ndarray:
        return self.store.effective_mask(i, self.original_masks[i])

    def has_unsaved_edits(self, i: int) -> bool:
        return self.store is not None and not np.array_equal(self._layer_mask(i), self._effective(i))

    def save(self, i: int | None = None, note: str = "") -> bool:
        if self.store is None:
            return False
        i = self.owner.browser.index if i is None else i
        mask = self._layer_mask(i)
        if mask.max(initial=0) > 4:
            show_error(f"Image {i}: label {int(mask.max())} is not a class (0..4); fix it before saving.")
            return False
        self.store.save_mask(i, mask, note)
        self._on_index(i)
        self.saved.emit(i)
        return True

    def _set_layer(self, i: int) -> None:
        self.owner.masks_layer.data[i] = self._effective(i)
        self.owner.masks_layer.refresh()
        self._on_index(i)

    def undo(self) -> None:
        i = self.owner.browser.index
        if self.store is not None and self.store.undo(i):
            self._set_layer(i)

    def redo(self) -> None:
        i = self.owner.browser.index
        if self.store is not None and self.store.redo(i):
            self._set_layer(i)

    def restore(self) -> None:
        i = self.owner.browser.index
        if self.store is not None:
            self.store.restore(i)
            self._set_layer(i)

    def toggle_exclude(self) -> None:
        i = self.owner.browser.index
        if self.store is None:
            return
        if self.store.is_excluded(i):
            self.store.include(i)
        else:
            self.store.exclude(i)
        self._on_index(i)

    def exclude_selected_group(self) -> None:
        item = self.queue.currentItem()
        if item is None or self.store is None:
            return
        entry = item.data(256)
        groups = [
            r["group"] for r in entry["reasons"] if r["kind"] in ("duplicate_mask", "near_duplicate_mask")
        ]
        if not groups:
            show_info("This entry is not part of a duplicate-mask group.")
            return
        self.store.exclude_many(groups[0], note="duplicate-mask group")
        show_info(f"Excluded {len(groups[0])} images from training.")
        self._on_index(self.owner.browser.index)

    def apply_suggested_move(self) -> None:
        """Move the selected entry's mask as its "misaligned" reason suggests; the result
        is an unsaved edit of the layer, to be checked and saved like any other."""
        from trainer.audit import move_mask

        item = self.queue.currentItem()
        if item is None or self.store is None:
            return
        entry = item.data(256)
        moves = [r for r in entry["reasons"] if r["kind"] == "misaligned"]
        if not moves:
            show_info("The model does not suggest moving this mask.")
            return
        i = entry["index"]
        self.owner.browser.set_index(i)
        layer = self.owner.masks_layer
        layer.data[i] = move_mask(self._layer_mask(i), moves[0]["shift_y"], moves[0]["shift_x"])
        layer.refresh()
        self._on_index(i)

    # -- display ---------------------------------------------------------------
    def _after_paint(self) -> None:
        if self.store is not None and self.owner.masks_layer is not None:
            self._on_index(self.owner.browser.index)

    def _on_index(self, i: int) -> None:
        previous = self._shown_index
        self._shown_index = i
        if self.store is None or self.owner.masks_layer is None:
            self.state_label.setText("No dataset.")
            return
        if self.autosave.isChecked() and previous != i and 0 <= previous < len(self.original_masks):
            if self.has_unsaved_edits(previous):
                self.save(previous, note="autosave")
        mask, excluded = self.store.state(i)
        changed = int((self._layer_mask(i) != self.original_masks[i]).sum())
        bits = [f"Image {i}"]
        bits.append("edited" if mask is not None else "original mask")
        if excluded:
            bits.append("EXCLUDED from training")
        if self.has_unsaved_edits(i):
            bits.append("unsaved changes")
        self.state_label.setText(" · ".join(bits) + f" · {changed} pixel(s) differ from the original")
        self.exclude_button.setText("Include in training" if excluded else "Exclude from training")
        self.history_list.clear()
        for e in self.store.history(i):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            self.history_list.addItem(
                f"{stamp}  {e.action}{'  ' + e.note if e.note else ''}{'  ◀' if e.current else ''}"
            )
        self._show_diff(i)

    def _show_diff(self, i: int) -> None:
        layers = self.viewer.layers
        shape = self.original_masks.shape
        changed = self._layer_mask(i) != self.original_masks[i]
        if DIFF not in layers and not changed.any():
            return  # the layer appears with the first edit, not before
        if DIFF not in layers or layers[DIFF].data.shape != shape:
            if DIFF in layers:
                layers.remove(DIFF)
            layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=DIFF, opacity=0.8, visible=False)
            layer.colormap = {0: (0, 0, 0, 0), 1: (0.1, 1.0, 0.4, 1.0), None: (0, 0, 0, 0)}
            layers.selection.active = self.owner.masks_layer
        diff = layers[DIFF]
        diff.data[i] = changed
        diff.refresh()

    def _quick_ranking(self) -> list[dict]:
        from trainer.audit import rank

        return rank(self._current_masks(), None, None, self._excluded())

    def _current_masks(self) -> np.ndarray:
        """The masks as the layer holds them now (saved corrections and unsaved strokes)."""
        return np.asarray(self.owner.masks_layer.data, dtype=np.uint8)

    def _excluded(self) -> set[int]:
        return self.store.excluded() if self.store is not None else set()

    def _fill_queue(self) -> None:
        from trainer.audit import describe_reason

        self.queue.clear()
        for entry in [r for r in self.ranking if r["score"] > 0.05][:500]:
            detail = describe_reason(entry["reasons"][0])
            item = QListWidgetItem(f"image {entry['index']:>5} · {entry['score']:.2f} · {detail}")
            item.setData(256, entry)
            self.queue.addItem(item)

    def _on_queue_clicked(self, item: QListWidgetItem) -> None:
        entry = item.data(256)
        self.owner.browser.set_index(entry["index"])
        if self.audit_pred is not None:
            self._show_disagreement(entry["index"])

    def _show_disagreement(self, i: int) -> None:
        layers = self.viewer.layers
        shape = self.original_masks.shape
        if DISAGREEMENT not in layers or layers[DISAGREEMENT].data.shape != shape:
            if DISAGREEMENT in layers:
                layers.remove(DISAGREEMENT)
            layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=DISAGREEMENT, opacity=0.7)
            layer.colormap = {0: (0, 0, 0, 0), 1: (1.0, 0.2, 0.9, 1.0), None: (0, 0, 0, 0)}
            layers.selection.active = self.owner.masks_layer
        layer = layers[DISAGREEMENT]
        layer.data[i] = self.audit_pred[i] != self._layer_mask(i)
        layer.refresh()

    # -- the audit -------------------------------------------------------------
    def start_audit(self, minutes: float | None = None, folds: int = 3):
        from trainer.process import _Child, child_audit

        if self.store is None or self._auditor is not None:
            return None
        images = np.asarray(self.owner.images_layer.data, dtype=np.uint8)
        masks = self._current_masks().copy()
        minutes = self.minutes_spin.value() if minutes is None else minutes
        self._auditor = _Child(child_audit, images, masks, sorted(self._excluded()), minutes, folds)
        self.audit_button.setEnabled(False)
        self.audit_status.setText(f"Training {folds} out-of-fold models ({minutes:g} min)…")
        self.timer.start()
        return self._auditor

    def _poll_audit(self) -> None:
        if self._auditor is None:
            self.timer.stop()
            return
        dead = not self._auditor.alive
        for msg in self._auditor.receive(limit=10**6 if dead else 200):
            if msg[0] == "progress":
                self.audit_status.setText(msg[1])
            elif msg[0] == "result":
                self.ranking, self.audit_pred = msg[1], msg[2]
                self._fill_queue()
                self.audit_status.setText(
                    f"Ranked {len(self.ranking)} images. Click an entry to see it; pink = the model disagrees."
                )
                self._finish_audit()
                return
            elif msg[0] == "error":
                self.audit_status.setText(f"Ranking failed: {msg[1]}")
                self._finish_audit()
                return
        if dead:
            self.audit_status.setText("The ranking process ended unexpectedly.")
            self._finish_audit()

    def _finish_audit(self) -> None:
        self._auditor = None
        self.timer.stop()
        self.audit_button.setEnabled(True)
        self.audit_done.emit()

    def shutdown(self) -> None:
        if self._auditor is not None:
            self._auditor.kill()
        self.detach()
