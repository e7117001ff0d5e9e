"""The main widget in a real napari viewer (needs a display: run under Xvfb)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from marsviewer._widget import MarsViewerWidget
from trainer.stats import class_presence


@pytest.fixture
def widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = MarsViewerWidget(viewer)
    viewer.window.add_dock_widget(w)
    return w


@pytest.fixture
def loaded(widget, qtbot):
    widget.load_sample()
    qtbot.waitUntil(lambda: not widget.loading, timeout=30_000)
    qtbot.waitUntil(lambda: widget.browser.loaded, timeout=5_000)
    return widget


def test_empty_state_offers_sample_and_open(widget):
    assert "synthetic Mars sample" in widget.dataset_panel.summary.text()
    assert (
        widget.dataset_panel.sample_button.isEnabled() and widget.dataset_panel.open_file_button.isEnabled()
    )
    assert not widget.dataset_panel.browse_box.isEnabled()


def test_sample_layers_and_imbalance(loaded):
    viewer = loaded.viewer
    kinds = sorted(type(layer).__name__ for layer in viewer.layers)
    assert kinds == ["Image", "Labels"]
    assert viewer.dims.axis_labels == ("image", "y", "x")  # the slider names what it moves through
    masks = loaded.masks_layer.data[:200]  # the labelled images; 60 unlabelled follow
    assert loaded.masks_layer.data.shape == (260, 64, 128)
    share = np.bincount(masks.ravel(), minlength=5) / masks.size
    np.testing.assert_allclose(loaded.dataset_panel.share_bars.values, share)
    np.testing.assert_array_equal(loaded.dataset_panel.presence_bars.values, class_presence(masks).sum(0))
    assert "200 labelled images of 64x128" in loaded.dataset_panel.summary.text()
    # The outlier group of the sample is listed first.
    assert loaded.dataset_panel.dup_list.count() >= 1
    assert (
        loaded.dataset_panel.dup_list.item(0)
        .text()
        .startswith(f"{len(loaded.browser.stats.duplicate_mask_groups[0])} images")
    )


def test_browsing_follows_slider_and_buttons(loaded, qtbot):
    viewer, b = loaded.viewer, loaded.browser
    viewer.dims.set_current_step(0, 17)
    assert b.index == 17 and loaded.dataset_panel.index_spin.value() == 17
    np.testing.assert_allclose(
        loaded.dataset_panel.composition_bars.values,
        np.bincount(loaded.masks_layer.data[17].ravel(), minlength=5) / (64 * 128),
    )
    loaded.dataset_panel.next_button.click()
    assert viewer.dims.current_step[0] == 18
    loaded.dataset_panel.prev_button.click()
    loaded.dataset_panel.prev_button.click()
    assert viewer.dims.current_step[0] == 16
    loaded.dataset_panel.index_spin.setValue(120)
    assert viewer.dims.current_step[0] == 120 and b.index == 120


def test_class_filter_jumps_between_images_with_that_class(loaded):
    b = loaded.browser
    presence = class_presence(loaded.masks_layer.data)
    with_rock = np.flatnonzero(presence[:, 4])
    assert len(with_rock) >= 1
    row = loaded.dataset_panel.filter_combo.findData(4)
    assert f"({len(with_rock)})" in loaded.dataset_panel.filter_combo.itemText(row)
    loaded.dataset_panel.filter_combo.setCurrentIndex(row)
    assert b.index == with_rock[0]
    seen = []
    for _ in range(len(with_rock)):
        seen.append(b.index)
        loaded.dataset_panel.next_button.click()
    assert sorted(seen) == with_rock.tolist()
    assert loaded.viewer.dims.current_step[0] == with_rock[0]  # wrapped around


def test_duplicate_group_click_steps_through_members(loaded):
    group = list(loaded.browser.stats.duplicate_mask_groups[0])
    item = loaded.dataset_panel.dup_list.item(0)
    loaded.dataset_panel.dup_list.itemClicked.emit(item)
    assert loaded.browser.index == group[0]
    loaded.dataset_panel.dup_list.itemClicked.emit(item)
    assert loaded.browser.index == group[1]
    assert "shares its mask" in loaded.dataset_panel.image_label.text()


def test_browse_step_is_fast(loaded, qtbot):
    """Moving to another image updates layers and widget well within 50 ms."""
    from qtpy.QtWidgets import QApplication

    viewer = loaded.viewer
    times = []
    for i in range(1, 41):
        t0 = time.perf_counter()
        viewer.dims.set_current_step(0, i)
        QApplication.processEvents()
        times.append(time.perf_counter() - t0)
    assert loaded.browser.index == 40
    assert np.median(times) < 0.050, f"median browse step {1000 * np.median(times):.1f} ms"


def test_bad_file_is_a_notification_and_viewer_stays_usable(loaded, tmp_path, qtbot, monkeypatch):
    import marsviewer._widget as wmod

    shown = []
    monkeypatch.setattr(wmod, "show_error", shown.append)
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip")
    loaded.open_path(bad)
    qtbot.waitUntil(lambda: not loaded.loading, timeout=10_000)
    assert shown and "not an npz" in shown[0] and str(bad) in shown[0]
    # The previous dataset is still there and browsable.
    assert loaded.browser.loaded and len(loaded.viewer.layers) == 2
    loaded.dataset_panel.next_button.click()
    assert loaded.dataset_panel.sample_button.isEnabled()
    shown.clear()
    pool = tmp_path / "frames"  # images without masks only: browsed as unlabelled images
    pool.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 12), i, np.uint8)).save(pool / f"f{i}.png")
    loaded.open_path(pool)
    qtbot.waitUntil(lambda: not loaded.loading, timeout=10_000)
    assert not shown and loaded.browser.n_labelled == 0 and loaded.browser.show == "unlabelled"
    loaded.dataset_panel.next_button.click()
    assert loaded.browser.index == 1


def test_opening_a_file_replaces_the_dataset(loaded, npz_path, qtbot):
    loaded.open_path(npz_path)
    qtbot.waitUntil(lambda: not loaded.loading, timeout=20_000)
    assert len(loaded.viewer.layers) == 2
    assert loaded.masks_layer.data.shape == (68, 64, 128)  # the 8 unlabelled images after the 60
    text = loaded.dataset_panel.summary.text()
    assert "mars_for_students.npz" in text and "60 labelled images" in text and "8 unlabelled" in text
    assert loaded.browser.show == "labelled" and len(loaded.browser.matching_indices()) == 60
    loaded.dataset_panel.show_combo.setCurrentIndex(loaded.dataset_panel.show_combo.findData("unlabelled"))
    assert loaded.browser.index == 60 and loaded.viewer.dims.current_step[0] == 60
    assert "unlabelled" in loaded.dataset_panel.image_label.text()


def test_layers_opened_by_napari_are_adopted(widget, npz_path):
    widget.viewer.open(str(npz_path), plugin="marsviewer")
    assert widget.browser.loaded and len(widget.browser) == 68 and widget.browser.n_labelled == 60
    widget.viewer.layers.clear()
    assert not widget.browser.loaded and not widget.dataset_panel.browse_box.isEnabled()


def test_label_next_tab_wiring(loaded):
    from marsviewer._label_next_model import NextEntry

    model, panel = loaded.session.label_next, loaded.label_next
    model.entries = [NextEntry(7, 0.5, "2 uncertain region(s), 30% of the image; unlike the labelled images")]
    model.queue_changed.emit()
    assert panel.queue.count() == 1 and "2 uncertain region(s)" in panel.queue.item(0).text()
    item = panel.queue.item(0)
    panel.queue.itemClicked.emit(item)
    assert loaded.browser.index == 7 and loaded.viewer.dims.current_step[0] == 7
    panel.confidence_spin.setValue(0.85)
    assert model.confidence == 0.85
    panel.seed_button.click()  # a labelled image: a message, nothing starts
    assert model.seed is None
    assert loaded.browser.show == "labelled"  # a labelled row: the show choice stays


def test_a_large_zarr_dataset_opens_lazily_and_paints(widget, tmp_path, qtbot, monkeypatch):
    """A converted dataset over the in-memory limit: napari reads the frames on screen,
    paint strokes land in the frame stack, save keeps them; the open dialog's mask values
    are those a folder is read with."""
    from marsviewer._stack import FrameStack
    from trainer import formats
    from trainer.convert import convert

    root = tmp_path / "frames"
    for sub, value in (("images", 90), ("masks", 255)):
        (root / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 56), value, np.uint8)).save(root / sub / f"f{i}.png")
    widget.dataset_panel.mapping_edit.setText("0:1,255:2")
    widget.open_path(root, widget.dataset_panel.mask_mapping())
    qtbot.waitUntil(lambda: not widget.loading, timeout=20_000)
    assert widget.browser.stats.classes[2].images == 3  # 255 read as bedrock
    assert widget.review.audit_button.isEnabled() and widget.label_next.rank_button.isEnabled()
    convert(root, tmp_path / "d.zarr", mask_mapping="0:1,255:2")
    monkeypatch.setattr(formats, "IN_MEMORY_BYTES", 1000)
    widget.open_path(tmp_path / "d.zarr")
    qtbot.waitUntil(lambda: not widget.loading, timeout=20_000)
    layer = widget.masks_layer
    assert isinstance(layer.data, FrameStack) and widget.session.review.active
    assert "3 labelled frames of 40x56, read from disk" in widget.dataset_panel.summary.text()
    assert "read from disk" in widget.dataset_panel.dup_hint.text()
    # ranking reads it from disk too, and says so
    assert widget.review.audit_button.isEnabled() and "Read from disk" in widget.review.audit_status.text()
    assert widget.label_next.rank_button.isEnabled()  # it scores frames read from disk
    assert "read from disk" not in widget.label_next.status.text()
    widget.viewer.dims.set_current_step(0, 2)
    layer.selected_label = 4
    layer.paint((2, 20, 20), 4)
    assert widget.session.review.has_unsaved_edits(2) and set(layer.data.written) == {2}
    assert widget.session.review.save() and (widget.session.review.store.state(2)[0] == 4).any()
    layer.fill((2, 39, 55), 3)  # the bucket: the whole frame but the stroke is one region
    assert (layer.data[2] == 3).sum() == 40 * 56 - (layer.data[2] == 4).sum()
    widget.session.review.undo()  # the saved stroke undone (the fill was never saved): the original
    assert (layer.data[2] == 2).all() and 2 not in layer.data.written
    widget.session.review.redo()
    assert (layer.data[2] == 4).sum() == (widget.session.review.store.state(2)[0] == 4).sum() > 0
    widget.viewer.dims.set_current_step(0, 0)
    assert (widget.viewer.layers[layer.name]._slice.image.raw == 2).all()
    widget.open_path(root, widget.dataset_panel.mask_mapping())  # in memory again: all back on
    qtbot.waitUntil(lambda: not widget.loading, timeout=20_000)
    assert widget.review.audit_button.isEnabled() and widget.label_next.rank_button.isEnabled()
    assert "read from disk" not in widget.review.audit_status.text().lower() + widget.label_next.status.text()
