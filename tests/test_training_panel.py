"""The Train tab's wiring over a real child process on tiny data: live prediction layers,
the IoU table, stop, a killed process, attaching to a run written by the CLI, predicting
everything (under Xvfb). What the training model does is tested in test_session.py."""

from __future__ import annotations

import numpy as np
import pytest

from marsviewer._widget import PREDICTION, UNCERTAINTY
from tests.conftest import JOB_WAIT_S
from trainer.cli import main as cli_main


@pytest.fixture
def widget(npz_widget):
    """The widget set to train the tiny preset on the CPU."""
    form = npz_widget.training.form
    form.preset.value = "tiny"
    form.device.value = "cpu"
    return npz_widget


def ended(widget) -> list:
    seen = []
    widget.session.training.run_ended.connect(seen.append)
    return seen


def test_train_shows_live_prediction_iou_and_predicts_all(widget, qtbot):
    panel, model = widget.training, widget.session.training
    panel.form.editors["epochs"].value = 2
    widget.browser.set_index(3)
    seen = ended(widget)
    panel.start_button.click()
    assert model.running and not panel.start_button.isEnabled() and panel.stop_button.isEnabled()
    assert not panel.config_box.isVisible()
    qtbot.waitUntil(lambda: bool(seen), timeout=JOB_WAIT_S * 1000)
    assert seen == ["finished"]
    assert panel.iou_table.item(5, 0).text() not in ("", "–")  # mIoU row filled
    keras = panel.iou_table.item(6, 0).text()  # the Keras figure, never above the headline
    assert keras not in ("", "–") and float(keras) <= float(panel.iou_table.item(5, 0).text())
    pred = widget.viewer.layers[PREDICTION]
    assert pred.data is model.prediction and pred.data[3].any()  # the live preview of image 3
    assert widget.viewer.layers[UNCERTAINTY].data[3].max() > 0
    assert pred.features["class"].tolist()[3] == "Sand"  # the status bar names classes
    assert panel.start_button.isEnabled() and panel.predict_button.isEnabled()
    assert widget.viewer.layers.selection.active is widget.masks_layer  # paint tools stay on the masks
    layers = widget.viewer.layers
    on_top = layers.index(widget.masks_layer)
    assert layers.index(PREDICTION) < on_top and layers.index(UNCERTAINTY) < on_top  # paint is seen
    done = []
    model.predicted.connect(lambda: done.append(1))
    panel.predict_button.click()
    qtbot.waitUntil(lambda: bool(done), timeout=JOB_WAIT_S * 1000)
    assert panel.worst_button.isEnabled()
    panel.worst_button.click()
    assert widget.browser.index == int(np.nanargmin(model.image_miou))
    assert "rank 1 of" in panel.worst_label.text()
    assert panel.confusion_table.item(1, 1).text().endswith("%")


def test_stop_saves_a_checkpoint(widget, qtbot):
    panel, model = widget.training, widget.session.training
    panel.form.editors["epochs"].value = 200
    seen = ended(widget)
    panel.start()
    qtbot.waitUntil(lambda: len(model.record.losses) >= 2, timeout=JOB_WAIT_S * 1000)
    panel.stop_button.click()
    qtbot.waitUntil(lambda: bool(seen), timeout=JOB_WAIT_S * 1000)
    assert seen == ["stopped"]
    assert model.record.last_checkpoint and "last.pt" in model.record.last_checkpoint
    assert panel.start_button.isEnabled()


def test_killed_training_process_is_reported_and_viewer_stays_usable(widget, qtbot, monkeypatch):
    import marsviewer._widget as wmod

    notified = []
    monkeypatch.setattr(wmod, "show_error", notified.append)
    panel, model = widget.training, widget.session.training
    panel.form.editors["epochs"].value = 200
    seen = ended(widget)
    panel.start()
    qtbot.waitUntil(lambda: len(model.record.losses) >= 1, timeout=JOB_WAIT_S * 1000)
    model.process.kill()
    qtbot.waitUntil(lambda: bool(seen), timeout=30_000)
    assert seen == ["failed"]
    assert "SIGKILL" in panel.status.text()
    assert notified and "Training failed" in notified[0]  # a napari notification too
    widget.dataset_panel.next_button.click()
    assert widget.browser.index == 1
    assert panel.start_button.isEnabled()


def _cli_run(npz_path, run_dir, epochs: int):
    """A finished run directory written by ``mars-trainer train``."""
    args = ["train", str(npz_path), "--run-dir", str(run_dir), "--preset", "tiny", "--epochs", str(epochs)]
    assert cli_main(args) == 0
    return run_dir


def test_attach_to_a_run_written_by_the_cli(widget, npz_path, tmp_path):
    run_dir = _cli_run(npz_path, tmp_path / "cli_run", epochs=2)
    panel, model = widget.training, widget.session.training
    assert model.attach(run_dir)
    assert model.record.state == "finished"
    assert len(model.record.val_iou) == 2 and len(panel.loss_plot.series[0][2]) > 0
    assert model.record.best_checkpoint.endswith("best.pt")
    assert panel.iou_table.item(0, 0).text() == "not trained"  # background has weight 0
    assert panel.iou_table.item(1, 0).text() != "not trained"
    assert not model.attach(tmp_path)  # not a run directory: a message, nothing breaks
    assert "not a run directory" in panel.status.text()


def test_config_form_is_generated_from_the_config_dataclass(qtbot):
    from dataclasses import fields

    from marsviewer._form import SHOWN, ConfigForm
    from trainer.config import TrainConfig, preset

    form = ConfigForm()
    meta = {f.name: f for f in fields(TrainConfig)}
    for name in SHOWN:  # one widget per field, its help as tooltip, its choices offered
        w = form.editors[name]
        assert meta[name].metadata["help"] in w.tooltip
        if meta[name].metadata.get("choices"):
            assert list(w.choices) == list(meta[name].metadata["choices"])
    form.preset.value = "tiny"
    form.device.value = "cpu"
    assert form.config() == preset("tiny").replace(device="cpu")  # the preset round-trips
    form.editors["lr"].value = 0.0005
    form.editors["class_weighting"].value = "none"
    cfg = form.config()
    assert cfg.lr == 0.0005 and cfg.class_weighting == "none" and cfg.base_width == preset("tiny").base_width
    form.editors["loss"].value = "ce:1,bogus:2"  # the CLI's message for the same value
    with pytest.raises(Exception, match="unknown loss 'bogus'; valid: ce, focal"):
        form.config()
    form.editors["epochs"].value = 0
    form.editors["minutes"].value = 0
    form.editors["loss"].value = "ce:1"
    with pytest.raises(Exception, match="epochs and minutes are both 0"):
        form.config()


def test_predict_any_image_layer(widget, npz_path, tmp_path, qtbot):
    run_dir = _cli_run(npz_path, tmp_path / "cli_run", epochs=1)
    model = widget.session.training
    assert not widget.training.predict_layer_button.isEnabled()  # no image of the person's yet
    assert model.attach(run_dir)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (45, 77, 3), dtype=np.uint8)  # any size, RGB
    widget.viewer.add_image(rgb, name="my frame", rgb=True)
    combo = widget.training.layer_combo
    assert [combo.itemText(i) for i in range(combo.count())] == ["my frame"]  # not the dataset's
    seen = []
    model.layer_predicted.connect(lambda name, masks: seen.append(name))
    widget.training.predict_layer_button.click()
    qtbot.waitUntil(lambda: bool(seen), timeout=JOB_WAIT_S * 1000)
    layer = widget.viewer.layers["my frame prediction"]
    assert layer.data.shape == (45, 77) and 1 <= layer.data.min() and layer.data.max() <= 4
    assert layer.features["class"].tolist()[2] == "Bedrock"
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.images import to_gray_u8
    from trainer.inference import predict_arrays

    net, _ = model_from_checkpoint(load_checkpoint(model.checkpoint))
    want = predict_arrays(net, to_gray_u8(rgb)[None], 1, "cpu")["masks"][0]
    np.testing.assert_array_equal(layer.data, want)
    widget.viewer.add_image(np.zeros((2, 3, 4, 5)), name="odd")  # 4-D gray: a message, no job
    assert model.predict_image("odd", widget.viewer.layers["odd"].data) is None


def test_a_preview_redraws_only_the_image_on_screen(widget):
    """A live preview of another image draws nothing; one of the image on screen redraws
    the prediction layers, thumbnails included (the viewer's CPU is training's too)."""
    model = widget.session.training
    widget.ensure_prediction_layers()
    widget.browser.set_index(2)
    calls = []
    for name in (PREDICTION, UNCERTAINTY):
        layer = widget.viewer.layers[name]
        layer.refresh = lambda *a, name=name, **k: calls.append(name)
    shape = model.prediction.shape[1:]
    mask, entropy = np.ones((1, *shape), np.uint8), np.ones((1, *shape), np.float16)
    model.show_preview([5], mask, entropy)
    assert calls == [] and model.prediction[5].all()  # written, not drawn
    model.show_preview([2], mask, entropy)
    assert calls == [PREDICTION, UNCERTAINTY]
    calls.clear()
    model.prediction_changed.emit(None)  # a whole prediction
    assert calls == [PREDICTION, UNCERTAINTY]
