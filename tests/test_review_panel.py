"""The Review tab's wiring in a viewer (under Xvfb): the layer is what gets saved, napari
painting marks unsaved edits, buttons and keys reach the model, the queue fills and an
audit runs as a child job. What the review model does is tested in test_session.py."""

from __future__ import annotations

import numpy as np
import pytest
from app_model.types import KeyBinding

from marsviewer._review_model import CHANGED, DISAGREEMENT
from tests.conftest import JOB_WAIT_S
from trainer.formats import read_npz


@pytest.fixture
def widget(npz_widget):
    return npz_widget


def test_buttons_edit_the_layer_and_the_store(widget, npz_path):
    panel, model, layer = widget.review, widget.session.review, widget.masks_layer
    assert model.store.path.parent.name == "mars_for_students.marsviewer"
    widget.browser.set_index(4)
    original = layer.data[4].copy()
    layer.data[4, 10:20, 10:30] = 3  # what a paint stroke does to the layer's data
    panel.save_button.click()
    assert "edited" in panel.state_label.text()
    np.testing.assert_array_equal(model.store.state(4)[0], layer.data[4])
    changed = widget.viewer.layers[CHANGED]
    assert changed.data is model.changed and changed.data[4].sum() == (original != layer.data[4]).sum()
    panel.undo_button.click()
    np.testing.assert_array_equal(layer.data[4], original)
    panel.redo_button.click()
    panel.restore_button.click()
    np.testing.assert_array_equal(layer.data[4], original)
    assert panel.history_list.count() == 3 and panel.history_list.item(2).text().endswith("◀")
    panel.exclude_button.click()
    assert "EXCLUDED" in panel.state_label.text() and panel.exclude_button.text() == "Include in training"
    np.testing.assert_array_equal(read_npz(npz_path).masks[4], original)  # the file is untouched


def test_painting_with_napari_marks_unsaved_changes_and_keys_save(widget, qtbot):
    widget.browser.set_index(3)
    layer = widget.masks_layer
    layer.brush_size = 5
    layer.paint((3, 30, 60), 4)  # what a brush stroke at that pixel does
    assert layer.data[3, 30, 60] == 4
    qtbot.waitUntil(lambda: "unsaved changes" in widget.review.state_label.text(), timeout=2000)
    widget.viewer.keymap[KeyBinding.from_str("Alt-S")](widget.viewer)
    assert "unsaved" not in widget.review.state_label.text()
    assert widget.session.review.store.state(3)[0][30, 60] == 4
    assert "Alt-S" in widget.review.toolTip()
    called = []
    widget.session.label_next.start_from_prediction = lambda: called.append(1)
    widget.viewer.keymap[KeyBinding.from_str("Alt-L")](widget.viewer)
    assert called == [1]


def test_queue_fills_and_a_click_visits_the_entry(widget, small_sample):
    panel = widget.review
    assert panel.queue.count() >= 1
    item = panel.queue.item(0)
    panel.queue.setCurrentItem(item)
    panel.queue.itemClicked.emit(item)
    assert widget.browser.index in small_sample.truth["outlier_group"]
    panel.exclude_group_button.click()
    assert widget.session.review.store.snapshot()[1] == set(small_sample.truth["outlier_group"])
    panel.step_queue(+1)
    assert panel.queue.currentRow() == 1


def test_audit_from_the_panel_ranks_and_shows_disagreement(widget, qtbot):
    panel = widget.review
    done = []
    widget.session.review.audit_done.connect(done.append)
    assert panel.start_audit(minutes=0.2, folds=2) is not None
    assert not panel.audit_button.isEnabled()
    qtbot.waitUntil(lambda: bool(done), timeout=JOB_WAIT_S * 1000)
    assert done == [True] and panel.audit_button.isEnabled() and panel.queue.count() > 0
    assert "pink = the model disagrees" in panel.audit_status.text()
    item = panel.queue.item(panel.queue.count() - 1)
    panel.queue.itemClicked.emit(item)
    assert DISAGREEMENT in widget.viewer.layers


def test_audit_of_a_dataset_read_from_disk_from_the_panel(
    widget, npz_path, small_sample, tmp_path, qtbot, monkeypatch
):
    """A dataset too large for memory ranks too: the child reads it from disk, with the
    exclusions saved in its store; the pasted-in group comes first, the excluded image
    is not listed, and an entry goes to its image."""
    from trainer import formats
    from trainer.convert import convert

    convert(npz_path, tmp_path / "d.zarr")
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    widget.open_path(tmp_path / "d.zarr")
    qtbot.waitUntil(lambda: not widget.loading, timeout=20_000)
    panel, model = widget.review, widget.session.review
    assert model.reads_from_disk() and panel.audit_button.isEnabled() and panel.queue.count() == 0
    assert "Read from disk" in panel.audit_status.text()
    widget.browser.set_index(2)
    model.toggle_exclude()
    done = []
    model.audit_done.connect(done.append)
    assert panel.start_audit(minutes=0.03, folds=2)  # duplicates rank first at any budget is not None
    qtbot.waitUntil(lambda: bool(done), timeout=JOB_WAIT_S * 1000)
    assert done == [True] and panel.queue.count() > 0 and "pink" in panel.audit_status.text()
    listed = [panel.queue.item(k).data(256).index for k in range(panel.queue.count())]
    group = small_sample.truth["outlier_group"]
    assert set(listed[: len(group)]) == set(group) and 2 not in listed
    panel.queue.itemClicked.emit(panel.queue.item(len(group)))
    assert widget.browser.index == listed[len(group)]
    # the predictions of the highest-scored images came back: the disagreement shows
    assert DISAGREEMENT in widget.viewer.layers and listed[len(group)] in model.audit_masks
