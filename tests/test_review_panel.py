"""Editing, saving, undo, exclusion and the review queue in the widget (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

from marsviewer._review import DIFF
from trainer.corrections import CorrectionStore
from trainer.formats import read_npz


@pytest.fixture
def widget(npz_widget):
    return npz_widget


def test_edit_save_undo_redo_restore(widget, npz_path):
    review, layer = widget.review, widget.masks_layer
    assert review.store is not None
    assert review.store.path.parent.name == "mars_for_students.marsviewer"
    widget.browser.set_index(4)
    original = layer.data[4].copy()
    layer.data[4, 10:20, 10:30] = 3  # what a paint stroke does to the layer's data
    assert review.has_unsaved_edits(4)
    assert review.save()
    assert "edited" in review.state_label.text()
    np.testing.assert_array_equal(review.store.state(4)[0], layer.data[4])
    assert widget.viewer.layers[DIFF].data[4].sum() == (original != layer.data[4]).sum()
    edited = layer.data[4].copy()
    review.undo()
    np.testing.assert_array_equal(layer.data[4], original)
    review.redo()
    np.testing.assert_array_equal(layer.data[4], edited)
    review.restore()
    np.testing.assert_array_equal(layer.data[4], original)
    assert review.history_list.count() == 2 and review.history_list.item(1).text().endswith("◀")
    # the original file is untouched
    np.testing.assert_array_equal(read_npz(npz_path).masks[4], original)


def test_saved_corrections_come_back_when_reopened(widget, npz_path, qtbot):
    widget.browser.set_index(2)
    widget.masks_layer.data[2, :8] = 4
    widget.review.save()
    widget.review.toggle_exclude()
    widget.open_path(npz_path)
    qtbot.waitUntil(lambda: not widget.loading, timeout=30_000)
    assert (widget.masks_layer.data[2, :8] == 4).all()
    assert widget.review.store.is_excluded(2)


def test_autosave_when_moving(widget):
    widget.review.autosave.setChecked(True)
    widget.browser.set_index(1)
    widget.masks_layer.data[1, 0:5, 0:5] = 2
    widget.browser.set_index(2)
    np.testing.assert_array_equal(widget.review.store.state(1)[0][0:5, 0:5], 2)


def test_queue_jumps_and_excludes_the_outlier_group(widget, small_sample):
    review = widget.review
    assert review.queue.count() >= len(small_sample.truth["outlier_group"])
    item = review.queue.item(0)
    review.queue.setCurrentItem(item)
    review._on_queue_clicked(item)
    assert widget.browser.index in small_sample.truth["outlier_group"]
    review.exclude_selected_group()
    store: CorrectionStore = review.store
    assert store.snapshot()[1] == set(small_sample.truth["outlier_group"])
    assert "EXCLUDED" in review.state_label.text()


def test_audit_from_the_panel_ranks_and_shows_disagreement(widget, qtbot, small_sample):
    review = widget.review
    with qtbot.waitSignal(review.audit_done, timeout=120_000):
        assert review.start_audit(minutes=0.2, folds=2) is not None
    assert review.audit_pred is not None and review.queue.count() > 0
    item = review.queue.item(review.queue.count() - 1)
    review._on_queue_clicked(item)
    assert "model disagrees" in widget.viewer.layers


def test_painting_with_napari_marks_unsaved_changes(widget, qtbot):
    widget.browser.set_index(3)
    layer = widget.masks_layer
    layer.brush_size = 5
    layer.paint((3, 30, 60), 4)  # what a brush stroke at that pixel does
    assert layer.data[3, 30, 60] == 4
    qtbot.waitUntil(lambda: "unsaved changes" in widget.review.state_label.text(), timeout=2000)
    assert widget.review.save()
    assert "unsaved" not in widget.review.state_label.text()


def test_a_misaligned_mask_is_moved_back_from_the_queue(widget):
    from trainer.audit import move_mask

    review, layer = widget.review, widget.masks_layer
    before = layer.data[3].copy()
    review.ranking = [
        {"index": 3, "score": 0.3, "reasons": [
            {"kind": "misaligned", "shift_y": 0, "shift_x": 5, "gain": 0.1, "score": 0.3},
        ]},
        {"index": 1, "score": 0.2, "reasons": [
            {"kind": "model_disagreement", "confident_disagreement": 0.2, "pixel_error": 0.3, "score": 0.2},
        ]},
    ]  # fmt: skip
    review._fill_queue()
    assert "move 5 px right" in review.queue.item(0).text()
    review.queue.setCurrentItem(review.queue.item(1))
    review.apply_suggested_move()  # no move suggested: nothing changes
    np.testing.assert_array_equal(layer.data[1], review.original_masks[1])
    review.queue.setCurrentItem(review.queue.item(0))
    review.apply_suggested_move()
    assert widget.browser.index == 3
    np.testing.assert_array_equal(layer.data[3], move_mask(before, 0, 5))
    assert "unsaved changes" in review.state_label.text()
    assert review.save()
    np.testing.assert_array_equal(review.store.state(3)[0], move_mask(before, 0, 5))
