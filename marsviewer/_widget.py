"""The main widget: four thin tabs over one ``Session``, and the glue between the
session's arrays and the viewer's layers, keys and notifications."""

from __future__ import annotations

import gc
import math
from pathlib import Path

from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QScrollArea, QTabWidget, QVBoxLayout, QWidget

from trainer.dataset import DatasetError

from ._dataset_panel import DatasetPanel
from ._label_next_panel import LabelNextPanel
from ._layers import (
    META_KEY,
    class_colormap,
    class_features,
    dataset_layer_data,
    ensure_layer,
    layer_classes,
    role_of,
)
from ._review_model import CHANGED, DISAGREEMENT
from ._review_panel import ReviewPanel
from ._session import Session
from ._train_panel import TrainingPanel

POLL_MS = 50
PREDICTION = "prediction"
UNCERTAINTY = "uncertainty (entropy)"
DERIVED = (PREDICTION, UNCERTAINTY, CHANGED, DISAGREEMENT)  # views of a dataset, not data
OVERLAY_COLOURS = {CHANGED: (0.1, 1.0, 0.4, 1.0), DISAGREEMENT: (1.0, 0.2, 0.9, 1.0)}


class MarsViewerWidget(QWidget):
    """Dock widget of the Mars Viewer plugin (``napari -w marsviewer``)."""

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = session = Session()
        self.browser = session.browser
        self.masks_layer = None
        self.images_layer = None
        self._worker = None
        self._build()
        self._connect_session()
        self._connect_viewer()
        for layer in list(self.viewer.layers):
            self._adopt(layer)
        self._list_predictable_layers()
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(session.poll)
        self.timer.start()
        # Closing napari must not leave a child process behind.
        self.destroyed.connect(lambda *_: session.shutdown())
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(session.shutdown)

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs)
        self.dataset_panel = DatasetPanel(self.browser, self._ask_file, self._ask_folder, self.load_sample)
        self.training = TrainingPanel(self.session.training)
        self.review = ReviewPanel(self.session.review)
        self.label_next = LabelNextPanel(self.session.label_next)
        for panel, title in (
            (self.dataset_panel, "Dataset"),
            (self.training, "Train"),
            (self.review, "Review"),
            (self.label_next, "Label next"),
        ):
            self.tabs.addTab(_scrolled(panel), title)
        self.training.uncertainty_check.toggled.connect(self._toggle_uncertainty)
        self.training.predict_layer_button.clicked.connect(self._predict_layer)

    def _connect_session(self) -> None:
        s = self.session
        s.notify.connect(_notify)
        s.browser.index_changed.connect(self._show_index)
        s.review.masks_changed.connect(self._on_masks_changed)
        s.review.overlay_changed.connect(self._show_overlay)
        s.training.prediction_changed.connect(self._show_prediction)
        s.training.busy_changed.connect(lambda: self.ensure_prediction_layers() if s.jobs() else None)
        s.training.layer_predicted.connect(self._show_layer_prediction)

    def _connect_viewer(self) -> None:
        v = self.viewer
        v.dims.events.current_step.connect(self._on_dims_step)
        v.layers.events.inserted.connect(lambda e: self._adopt(e.value))
        v.layers.events.removed.connect(self._on_layer_removed)
        for event in (v.layers.events.inserted, v.layers.events.removed):
            event.connect(lambda _e=None: self._list_predictable_layers())
        v.scene.camera.events.connect(lambda _e=None: self.session.user_active())
        keys = (
            ("Alt-S", lambda: self.session.review.save()),
            ("Alt-Z", self.session.review.undo),
            ("Alt-Shift-Z", self.session.review.redo),
            ("Alt-E", self.session.review.toggle_exclude),
            ("Alt-N", lambda: self.review.step_queue(+1)),
            ("Alt-P", lambda: self.review.step_queue(-1)),
            ("Alt-L", lambda: self.session.label_next.start_from_prediction()),
        )
        for key, action in keys:
            v.bind_key(key, lambda _viewer, a=action: a(), overwrite=True)

    # -- opening ---------------------------------------------------------------
    def _ask_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a competition .npz", "", "NumPy archives (*.npz)")
        if path:
            self.open_path(path, self.dataset_panel.mask_mapping())

    def _ask_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a folder of image/mask pairs or a .zarr dataset")
        if path:
            self.open_path(path, self.dataset_panel.mask_mapping())

    def open_path(self, path: str | Path, mask_mapping: str = "identity"):
        """Read a dataset in a worker thread; errors become notifications. A converted zarr
        dataset too large for memory opens lazily (frames read as they are shown)."""
        from trainer.formats import open_dataset

        return self._start_load(
            f"Opening {Path(path).name}…", open_dataset, str(path), mask_mapping=mask_mapping, lazy=True
        )

    def load_sample(self):
        """Generate the built-in synthetic Mars sample (260 images, a second or two)."""
        from ._sample import sample_dataset

        return self._start_load("Generating the synthetic Mars sample…", sample_dataset)

    def _start_load(self, text: str, func, *args, **kwargs):
        self.dataset_panel.set_loading(text)
        # Passing "errored" here stops the worker from re-raising into the Qt loop:
        # a bad file is a notification, not a traceback.
        connect = {"returned": self.show_dataset, "errored": self._on_load_error, "finished": self._on_loaded}
        worker = create_worker(func, *args, _start_thread=False, _connect=connect, **kwargs)
        self._worker = worker
        worker.start()
        return worker

    @property
    def loading(self) -> bool:
        """A dataset is being read; false again once its layers (or its error) are shown."""
        return self._worker is not None

    def _on_load_error(self, exc: Exception) -> None:
        show_error(str(exc))
        self.browser.dataset_changed.emit()  # the panel shows what is open again

    def _on_loaded(self) -> None:
        self.dataset_panel.set_loading(None)
        self._worker = None

    def show_dataset(self, dataset) -> None:
        """Replace the layers of any previous dataset with this one's."""
        try:
            layer_data = dataset_layer_data(dataset)
        except DatasetError as exc:
            self._on_load_error(exc)
            return
        for layer in [lyr for lyr in self.viewer.layers if role_of(lyr) or lyr.name in DERIVED]:
            self.viewer.layers.remove(layer)
        for data, kwargs, kind in layer_data:
            getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self.viewer.dims.set_current_step(0, 0)
        self.viewer.reset_view()

    # -- predicting any image layer ----------------------------------------------
    def predictable_layers(self) -> list:
        """Image layers the person opened: not the dataset's, not a view of it."""
        return [
            lyr
            for lyr in self.viewer.layers
            if isinstance(lyr, Image) and not role_of(lyr) and lyr.name not in DERIVED
        ]

    def _list_predictable_layers(self) -> None:
        combo = self.training.layer_combo
        current = combo.currentText()
        combo.clear()
        combo.addItems([lyr.name for lyr in self.predictable_layers()])
        if current:
            combo.setCurrentText(current)
        self.training.predict_layer_button.setEnabled(combo.count() > 0)

    def _predict_layer(self):
        name = self.training.layer_combo.currentText()
        if name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        return self.session.training.predict_image(name, layer.data, rgb=bool(layer.rgb))

    def _show_layer_prediction(self, name: str, masks) -> None:
        t = self.session.browser
        layer = ensure_layer(
            self.viewer, f"{name} prediction", masks, "labels",
            colormap=class_colormap(t.classes), opacity=0.6, features=class_features(t.classes),
        )  # fmt: skip
        if name in self.viewer.layers:
            source = self.viewer.layers[name]
            layer.scale, layer.translate = source.scale[-masks.ndim :], source.translate[-masks.ndim :]

    # -- following the viewer's layers -----------------------------------------
    def _on_layer_removed(self, event) -> None:
        if event.value is self.masks_layer:
            self.masks_layer = None
            self.session.clear()
        if event.value is self.images_layer:
            self.images_layer = None

    def _adopt(self, layer) -> None:
        role = role_of(layer)
        if role == "images":
            self.images_layer = layer
        elif role == "masks":
            self.masks_layer = layer
            info = layer.metadata[META_KEY]
            images = self.images_layer
            n_test = images.metadata[META_KEY].get("n_test", 0) if images is not None else 0
            classes = layer_classes(info)
            layer.features = class_features(classes)
            layer.colormap = class_colormap(classes)
            # napari emits "paint" just before it writes the stroke: look once it has.
            layer.events.paint.connect(lambda _e=None: self._on_paint())
            self.session.set_dataset(
                images.data if images is not None else None, layer.data, info.get("names"),
                info.get("source", ""), n_test, info.get("keys"), classes,
            )  # fmt: skip
            settle_garbage_collector()

    def _on_masks_changed(self, _rows) -> None:
        if self.masks_layer is not None:
            self.masks_layer.refresh()
        self.dataset_panel.show_index(self.browser.index)  # its class shares

    def _on_paint(self) -> None:
        self.session.user_active()
        QTimer.singleShot(0, self.session.review.mask_edited)

    # -- the session's arrays as layers ------------------------------------------
    def _show_index(self, index: int) -> None:
        self.session.user_active()
        if self.masks_layer is not None and self.viewer.dims.ndim >= 3:
            if self.viewer.dims.current_step[0] != index:
                self.viewer.dims.set_current_step(0, index)

    def _on_dims_step(self, _event=None) -> None:
        self.session.user_active()
        if self.masks_layer is not None and self.viewer.dims.ndim >= 3:
            self.browser.set_index(int(self.viewer.dims.current_step[0]))

    def ensure_prediction_layers(self) -> None:
        t = self.session.training
        if t.prediction is None or self.masks_layer is None:
            return
        classes = self.session.browser.classes
        ensure_layer(
            self.viewer, PREDICTION, t.prediction, "labels", keep_selected=self.masks_layer,
            colormap=class_colormap(classes), opacity=0.6, features=class_features(classes),
        )  # fmt: skip
        ensure_layer(
            self.viewer, UNCERTAINTY, t.entropy, "image", keep_selected=self.masks_layer,
            colormap="magma", contrast_limits=(0.0, math.log(len(classes))), blending="additive",
            visible=self.training.uncertainty_check.isChecked(),
        )  # fmt: skip

    def _show_prediction(self, rows) -> None:
        """Redraw the prediction layers after ``rows`` were written (None: all). A live
        preview of an image not on screen needs nothing drawn (napari reads it when the
        person gets there): every redraw is CPU taken from the training on the same cores."""
        t = self.session.training
        if t.prediction is None:
            return
        if PREDICTION not in self.viewer.layers and not (
            t.running or t.predictor or t.worst_order is not None
        ):
            return  # the layers appear with the first prediction, not with the dataset
        new = PREDICTION not in self.viewer.layers
        self.ensure_prediction_layers()
        if rows is not None and not new and self.viewer.dims.current_step[0] not in rows:
            return
        self.viewer.layers[PREDICTION].refresh()
        self.viewer.layers[UNCERTAINTY].refresh()

    def _toggle_uncertainty(self, on: bool) -> None:
        if UNCERTAINTY in self.viewer.layers:
            self.viewer.layers[UNCERTAINTY].visible = on

    def _show_overlay(self, name: str, _index: int) -> None:
        review = self.session.review
        data = review.changed if name == CHANGED else review.disagreement
        if data is None or self.masks_layer is None:
            return
        colours = {0: (0, 0, 0, 0), 1: OVERLAY_COLOURS[name], None: (0, 0, 0, 0)}
        layer = ensure_layer(
            self.viewer, name, data, "labels", keep_selected=self.masks_layer,
            opacity=0.8 if name == CHANGED else 0.7, visible=name != CHANGED, colormap=colours,
        )  # fmt: skip
        layer.refresh()


def _notify(text: str, level: str) -> None:
    (show_error if level == "error" else show_info)(text)


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.NoFrame)
    area.setWidget(widget)
    return area


def settle_garbage_collector() -> None:
    """Collect once, then leave everything alive now (napari, Qt, the dataset's layers) out
    of Python's full collections. napari's process holds so many objects that a full
    collection took 225-290 ms here, the longest browse step while training ran; the
    objects frozen are long-lived anyway."""
    gc.collect()
    gc.freeze()
