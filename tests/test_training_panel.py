"""Training from the widget: a real child process on tiny data, stop, a killed process,
attaching to a run directory written by the CLI, predicting everything (under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

from marsviewer._training import PREDICTION, UNCERTAINTY
from trainer.cli import main as cli_main


@pytest.fixture
def widget(npz_widget):
    """The widget set to train the tiny preset on the CPU."""
    form = npz_widget.training.form
    form.preset_combo.setCurrentText("tiny")
    form.device_combo.setCurrentIndex(form.device_combo.count() - 1)  # CPU
    return npz_widget


def test_train_shows_live_prediction_iou_and_predicts_all(widget, qtbot):
    panel = widget.training
    panel.form.editors["epochs"].setValue(2)
    widget.browser.set_index(3)
    with qtbot.waitSignal(panel.run_ended, timeout=90_000) as blocker:
        assert panel.start() is not None
        assert not panel.start_button.isEnabled() and panel.stop_button.isEnabled()
    assert blocker.args == ["finished"]
    h = panel.history
    assert len(h.val_iou) == 2 and len(h.losses) > 0
    assert panel.iou_table.item(5, 0).text() not in ("", "–")  # mIoU row filled
    keras = panel.iou_table.item(6, 0).text()  # the Keras figure, never above the headline
    assert keras not in ("", "–") and float(keras) <= float(panel.iou_table.item(5, 0).text())
    pred = widget.viewer.layers[PREDICTION].data
    assert pred[3].any(), "the image being viewed got a live prediction"
    assert widget.viewer.layers[UNCERTAINTY].data[3].max() > 0
    assert panel.first_preview_s is not None and panel.first_preview_s < 30
    assert panel.start_button.isEnabled() and panel.predict_button.isEnabled()
    assert widget.viewer.layers.selection.active is widget.masks_layer  # paint tools stay on the masks

    with qtbot.waitSignal(panel.prediction_done, timeout=60_000):
        assert panel.predict_all() is not None
    assert (pred.reshape(len(pred), -1).max(axis=1) > 0).all()
    assert panel.worst_order is not None and len(panel.worst_order) == len(pred)
    panel.go_to_next_worst()
    worst = int(np.nanargmin(panel.image_miou))
    assert widget.browser.index == worst
    assert panel.confusion_table.item(1, 1).text().endswith("%")


def test_stop_saves_a_checkpoint(widget, qtbot):
    panel = widget.training
    panel.form.editors["epochs"].setValue(200)
    panel.start()
    qtbot.waitUntil(lambda: len(panel.history.losses) >= 2, timeout=60_000)
    with qtbot.waitSignal(panel.run_ended, timeout=60_000) as blocker:
        panel.stop()
    assert blocker.args == ["stopped"]
    assert panel.history.last_checkpoint and "last.pt" in panel.history.last_checkpoint
    assert panel.start_button.isEnabled()


def test_killed_training_process_is_reported_and_viewer_stays_usable(widget, qtbot):
    panel = widget.training
    panel.form.editors["epochs"].setValue(200)
    panel.start()
    qtbot.waitUntil(lambda: len(panel.history.losses) >= 1, timeout=60_000)
    with qtbot.waitSignal(panel.run_ended, timeout=30_000) as blocker:
        panel.process.kill()
    assert blocker.args == ["failed"]
    assert "SIGKILL" in panel.status.text()
    widget.next_button.click()
    assert widget.browser.index == 1
    assert panel.start_button.isEnabled()


def _cli_run(npz_path, run_dir, epochs: int):
    """A finished run directory written by ``mars-trainer train``."""
    args = ["train", str(npz_path), "--run-dir", str(run_dir), "--preset", "tiny", "--epochs", str(epochs)]
    assert cli_main(args) == 0
    return run_dir


def test_attach_to_a_run_written_by_the_cli(widget, qtbot, npz_path, tmp_path):
    run_dir = _cli_run(npz_path, tmp_path / "cli_run", epochs=2)
    panel = widget.training
    assert panel.attach(run_dir)
    assert panel.history.state == "finished"
    assert len(panel.history.val_iou) == 2 and len(panel.loss_plot.series[0][2]) > 0
    assert panel.history.best_checkpoint.endswith("best.pt")
    assert not panel.attach(tmp_path)  # not a run directory: a message, nothing breaks
    assert "not a run directory" in panel.status.text()


def test_background_row_says_not_trained(widget, qtbot, npz_path, tmp_path):
    run_dir = _cli_run(npz_path, tmp_path / "cli_run2", epochs=1)
    panel = widget.training
    assert panel.attach(run_dir)
    assert panel.iou_table.item(0, 0).text() == "not trained"
    assert panel.iou_table.item(1, 0).text() != "not trained"
