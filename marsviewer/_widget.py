"""The main widget: open a dataset, browse it, see its class balance and duplicate masks."""

from __future__ import annotations

from pathlib import Path

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from trainer.classes import CLASSES
from trainer.dataset import Dataset

from ._browser import DatasetBrowser
from ._charts import ClassBars
from ._layers import META_KEY, dataset_layer_data, role_of

EMPTY_TEXT = (
    "No dataset yet. Open a competition .npz, a folder of image/mask pairs, "
    "or the built-in synthetic Mars sample."
)


class MarsViewerWidget(QWidget):
    """Dock widget of the Mars Viewer plugin (``napari -w marsviewer``)."""

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.browser = DatasetBrowser()
        self.masks_layer = None
        self.images_layer = None
        self._worker = None
        self._build()
        self.browser.dataset_changed.connect(self._on_dataset_changed)
        self.browser.index_changed.connect(self._on_index_changed)
        self.viewer.dims.events.current_step.connect(self._on_dims_step)
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        for layer in list(self.viewer.layers):
            self._adopt(layer)
        self._on_dataset_changed()

    # -- construction ----------------------------------------------------------
    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.tabs = QTabWidget()
        outer.addWidget(self.tabs)
        page = QWidget()
        root = QVBoxLayout(page)
        self.tabs.addTab(_scrolled(page), "Dataset")

        box = QGroupBox("Dataset")
        lay = QVBoxLayout(box)
        self.summary = QLabel(EMPTY_TEXT)
        self.summary.setWordWrap(True)
        lay.addWidget(self.summary)
        row = QHBoxLayout()
        self.open_file_button = QPushButton("Open .npz…")
        self.open_folder_button = QPushButton("Open folder…")
        self.sample_button = QPushButton("Synthetic sample")
        for b in (self.open_file_button, self.open_folder_button, self.sample_button):
            row.addWidget(b)
        lay.addLayout(row)
        self.open_file_button.clicked.connect(self._ask_file)
        self.open_folder_button.clicked.connect(self._ask_folder)
        self.sample_button.clicked.connect(self.load_sample)
        root.addWidget(box)

        self.browse_box = QGroupBox("Browse")
        lay = QVBoxLayout(self.browse_box)
        row = QHBoxLayout()
        self.prev_button = QPushButton("◀ Prev")
        self.index_spin = QSpinBox()
        self.index_spin.setKeyboardTracking(False)
        self.count_label = QLabel("of 0")
        self.next_button = QPushButton("Next ▶")
        for w in (self.prev_button, self.index_spin, self.count_label, self.next_button):
            row.addWidget(w)
        lay.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Show"))
        self.filter_combo = QComboBox()
        row.addWidget(self.filter_combo, 1)
        lay.addLayout(row)
        self.image_label = QLabel("")
        self.image_label.setWordWrap(True)
        lay.addWidget(self.image_label)
        self.composition_bars = ClassBars("This image (pixel share)")
        lay.addWidget(self.composition_bars)
        self.prev_button.clicked.connect(lambda: self.browser.step(-1))
        self.next_button.clicked.connect(lambda: self.browser.step(+1))
        self.index_spin.valueChanged.connect(self.browser.set_index)
        self.filter_combo.currentIndexChanged.connect(self._on_filter_chosen)
        root.addWidget(self.browse_box)

        self.balance_box = QGroupBox("Class balance (whole dataset)")
        lay = QVBoxLayout(self.balance_box)
        self.share_bars = ClassBars("Pixel share")
        self.presence_bars = ClassBars("Images containing the class")
        lay.addWidget(self.share_bars)
        lay.addWidget(self.presence_bars)
        root.addWidget(self.balance_box)

        self.dup_box = QGroupBox("Duplicate masks")
        lay = QVBoxLayout(self.dup_box)
        self.dup_hint = QLabel("")
        self.dup_hint.setWordWrap(True)
        lay.addWidget(self.dup_hint)
        self.dup_list = QListWidget()
        self.dup_list.setMaximumHeight(110)
        self.dup_list.itemClicked.connect(self._on_group_clicked)
        lay.addWidget(self.dup_list)
        root.addWidget(self.dup_box)
        root.addStretch(1)

        from ._training import TrainingPanel

        self.training = TrainingPanel(self)
        self.tabs.addTab(_scrolled(self.training), "Train")
        from ._review import ReviewPanel

        self.review = ReviewPanel(self)
        self.tabs.addTab(_scrolled(self.review), "Review")

    # -- opening ---------------------------------------------------------------
    def _ask_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a competition .npz", "", "NumPy archives (*.npz)")
        if path:
            self.open_path(path)

    def _ask_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a folder of image/mask pairs")
        if path:
            self.open_path(path)

    def open_path(self, path: str | Path, mask_mapping: str = "identity"):
        """Read a dataset in a worker thread; errors become notifications."""
        from trainer.formats import open_dataset

        self.summary.setText(f"Opening {Path(path).name}…")
        return self._start_load(open_dataset, str(path), mask_mapping=mask_mapping)

    def load_sample(self):
        """Generate the built-in synthetic Mars sample (200 images, a second or two)."""
        from trainer.synth import generate

        from ._sample import SAMPLE_IMAGES, SAMPLE_SEED

        self.summary.setText("Generating the synthetic Mars sample…")
        return self._start_load(lambda: generate(SAMPLE_IMAGES, 0, seed=SAMPLE_SEED).dataset)

    def _start_load(self, func, *args, **kwargs):
        for b in (self.open_file_button, self.open_folder_button, self.sample_button):
            b.setEnabled(False)
        # Passing "errored" here stops the worker from re-raising into the Qt loop:
        # a bad file is a notification, not a traceback.
        worker = create_worker(
            func,
            *args,
            _start_thread=False,
            _connect={
                "returned": self.show_dataset,
                "errored": self._on_load_error,
                "finished": self._on_load_finished,
            },
            **kwargs,
        )
        self._worker = worker
        worker.start()
        return worker

    @property
    def loading(self) -> bool:
        """A dataset is being read; false again once its layers (or its error) are shown."""
        return self._worker is not None

    def _on_load_error(self, exc: Exception) -> None:
        show_error(str(exc))
        self._on_dataset_changed()

    def _on_load_finished(self) -> None:
        for b in (self.open_file_button, self.open_folder_button, self.sample_button):
            b.setEnabled(True)
        self._worker = None

    def show_dataset(self, dataset: Dataset) -> None:
        """Replace the layers of any previous dataset with this one's."""
        from ._review import DIFF, DISAGREEMENT
        from ._training import PREDICTION, UNCERTAINTY

        derived = (PREDICTION, UNCERTAINTY, DIFF, DISAGREEMENT)  # views of the old dataset
        for layer in [lyr for lyr in self.viewer.layers if role_of(lyr) or lyr.name in derived]:
            self.viewer.layers.remove(layer)
        for data, kwargs, kind in dataset_layer_data(dataset):
            getattr(self.viewer, f"add_{kind}")(data, **kwargs)
        self.viewer.dims.set_current_step(0, 0)
        self.viewer.reset_view()

    # -- following the viewer's layers -----------------------------------------
    def _on_layer_inserted(self, event) -> None:
        self._adopt(event.value)

    def _on_layer_removed(self, event) -> None:
        if event.value is self.masks_layer:
            self.masks_layer = None
            self.review.detach()
            self.browser.masks = None
            self.browser.stats = None
            self._on_dataset_changed()
        if event.value is self.images_layer:
            self.images_layer = None

    def _adopt(self, layer) -> None:
        role = role_of(layer)
        if role == "images":
            self.images_layer = layer
            self.browser.n_test = layer.metadata[META_KEY].get("n_test", 0)
        elif role == "masks":
            self.masks_layer = layer
            info = layer.metadata[META_KEY]
            n_test = self.images_layer.metadata[META_KEY].get("n_test", 0) if self.images_layer else 0
            self.browser.set_dataset(layer.data, info.get("names"), info.get("source", ""), n_test)
            if self.images_layer is not None and self.images_layer.data.shape == layer.data.shape:
                self.review.attach_dataset(self.images_layer.data, layer, info.get("source", ""))

    # -- reacting to the browser -----------------------------------------------
    def _on_dataset_changed(self) -> None:
        b = self.browser
        loaded = b.loaded and b.stats is not None
        for box in (self.browse_box, self.balance_box, self.dup_box):
            box.setEnabled(loaded)
        self.filter_combo.blockSignals(True)
        self.filter_combo.clear()
        self.dup_list.clear()
        if not loaded:
            self.summary.setText(EMPTY_TEXT)
            self.filter_combo.blockSignals(False)
            return
        n = len(b)
        h, w = b.masks.shape[1:]
        test = f", {b.n_test} unlabelled test images (not shown)" if b.n_test else ""
        self.summary.setText(f"<b>{_source_title(b.source)}</b>: {n} images of {h}x{w}{test}")
        self.index_spin.blockSignals(True)
        self.index_spin.setRange(0, n - 1)
        self.index_spin.setValue(b.index)
        self.index_spin.blockSignals(False)
        self.count_label.setText(f"of {n - 1}")
        self.filter_combo.addItem(f"All images ({n})", None)
        for c in CLASSES:
            count = int(b.presence[:, c.id].sum())
            self.filter_combo.addItem(f"Images with {c.name} ({count})", c.id)
        self.filter_combo.blockSignals(False)
        stats = b.stats
        self.share_bars.set_values(
            [c.share for c in stats.classes], [_percent(c.share) for c in stats.classes]
        )
        self.presence_bars.set_values(
            [c.images for c in stats.classes],
            [f"{c.images} ({100 * c.images / max(n, 1):.0f}%)" for c in stats.classes],
        )
        groups = stats.duplicate_mask_groups
        if groups:
            self.dup_hint.setText(
                f"{len(groups)} group(s) of images share an identical mask: often pasted-in "
                "outliers or copied labels. Click a group to step through it."
            )
        else:
            self.dup_hint.setText("No two images have identical masks.")
        for g in groups:
            shown = ", ".join(map(str, g[:8])) + (", …" if len(g) > 8 else "")
            item = QListWidgetItem(f"{len(g)} images: {shown}")
            item.setData(256, list(g))  # Qt.UserRole
            self.dup_list.addItem(item)
        self._on_index_changed(b.index)

    def _on_index_changed(self, index: int) -> None:
        b = self.browser
        if not b.loaded:
            return
        self.index_spin.blockSignals(True)
        self.index_spin.setValue(index)
        self.index_spin.blockSignals(False)
        comp = b.composition(index)
        self.composition_bars.set_values(comp, [_percent(v) for v in comp])
        name = b.names[index] if index < len(b.names) else str(index)
        group = b.group_of(index)
        extra = f" · shares its mask with {len(group) - 1} other image(s)" if group else ""
        self.image_label.setText(f"Image {index} ({name}){extra}")
        if self.masks_layer is not None and self.viewer.dims.ndim >= 3:
            if self.viewer.dims.current_step[0] != index:
                self.viewer.dims.set_current_step(0, index)

    def _on_dims_step(self, event=None) -> None:
        if self.masks_layer is None or self.viewer.dims.ndim < 3:
            return
        self.browser.set_index(int(self.viewer.dims.current_step[0]))

    def _on_filter_chosen(self, _row: int) -> None:
        self.browser.set_filter(self.filter_combo.currentData())

    def _on_group_clicked(self, item: QListWidgetItem) -> None:
        members = item.data(256)
        current = self.browser.index
        # Step through the group: from a member, go to the next one; else to the first.
        later = [i for i in members if i > current] if current in members else []
        self.browser.set_index(later[0] if later else members[0])
        show_info(f"Image {self.browser.index}: one of {len(members)} images with the same mask")


def _scrolled(widget: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.NoFrame)
    area.setWidget(widget)
    return area


def _source_title(source: str) -> str:
    if source.startswith("synthetic:"):
        parts = source.split(":")
        return f"Synthetic Mars sample (seed {parts[2]})" if len(parts) > 2 else "Synthetic Mars sample"
    return Path(source).name or source


def _percent(share: float) -> str:
    if share == 0:
        return "0%"
    if share < 0.001:
        return "<0.1%"
    return f"{100 * share:.1f}%" if share < 0.1 else f"{100 * share:.0f}%"
