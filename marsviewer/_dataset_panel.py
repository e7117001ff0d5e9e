"""The Dataset tab: open a dataset, browse it, its class balance and duplicate masks.
Every action is one call into the session's ``DatasetBrowser``; the opening buttons call
back into the main widget, which reads files in a worker thread."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._bars import ClassBars
from ._browser import DatasetBrowser
from ._stack import is_stack

EMPTY_TEXT = (
    "No dataset yet. Open a competition .npz, a folder of image/mask pairs, "
    "or the built-in synthetic Mars sample."
)


class DatasetPanel(QWidget):
    def __init__(self, browser: DatasetBrowser, open_file, open_folder, open_sample, parent=None) -> None:
        super().__init__(parent)
        self.browser = browser
        self._build(open_file, open_folder, open_sample)
        browser.dataset_changed.connect(self._on_dataset_changed)
        browser.index_changed.connect(self.show_index)
        browser.show_changed.connect(self._on_show_changed)
        browser.filter_changed.connect(lambda _c: self._show_count())
        self._on_dataset_changed()

    def _build(self, open_file, open_folder, open_sample) -> None:
        root = QVBoxLayout(self)
        box = QGroupBox("Dataset")
        lay = QVBoxLayout(box)
        self.summary = QLabel(EMPTY_TEXT)
        self.summary.setWordWrap(True)
        lay.addWidget(self.summary)
        row = QHBoxLayout()
        self.open_file_button = QPushButton("Open .npz…")
        self.open_folder_button = QPushButton("Open folder…")
        self.sample_button = QPushButton("Synthetic sample")
        for b, action in ((self.open_file_button, open_file), (self.open_folder_button, open_folder),
                          (self.sample_button, open_sample)):  # fmt: skip
            row.addWidget(b)
            b.clicked.connect(lambda *_, a=action: a())
        self.open_folder_button.setToolTip("A folder of images and masks, or a converted .zarr dataset")
        lay.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Mask values:"))
        self.mapping_edit = QLineEdit()
        self.mapping_edit.setPlaceholderText("identity  (or ai4mars, 0:1,255:4, #ff0000:4, a .toml file)")
        self.mapping_edit.setToolTip(
            "How the masks' values become classes when a folder is opened: 'identity' (0..4), "
            "'ai4mars', value pairs '0:1,255:4', colour pairs '#000000:1,#ff0000:4' for RGB masks, "
            "class names as targets ('255:big rock'), or a TOML file of pairs. The same text as "
            "mars-trainer's --mask-mapping."
        )
        row.addWidget(self.mapping_edit, 1)
        lay.addLayout(row)
        root.addWidget(box)
        root.addWidget(self._build_browse())

        self.balance_box = QGroupBox("Class balance (labelled images)")
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
        self.dup_list.itemClicked.connect(lambda item: self.browser.visit_group(item.data(256)))
        lay.addWidget(self.dup_list)
        root.addWidget(self.dup_box)
        root.addStretch(1)

    def mask_mapping(self) -> str:
        """The mask mapping typed in the dialog ("identity" when empty)."""
        return self.mapping_edit.text().strip() or "identity"

    def _build_browse(self) -> QGroupBox:
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
        # A row each: with thousands of images, "labelled (12345)" and "Background (12345)"
        # side by side do not fit a dock's width.
        form = QFormLayout()
        self.show_combo = QComboBox()
        self.show_combo.setToolTip("browse the labelled images, the unlabelled ones, or all")
        form.addRow("Show", self.show_combo)
        self.filter_combo = QComboBox()
        self.filter_combo.setToolTip("only images whose mask has this class (images with it in brackets)")
        form.addRow("with", self.filter_combo)
        lay.addLayout(form)
        self.image_label = QLabel("")
        self.image_label.setWordWrap(True)
        lay.addWidget(self.image_label)
        self.composition_bars = ClassBars("This image (pixel share)")
        lay.addWidget(self.composition_bars)
        self.prev_button.clicked.connect(lambda: self.browser.step(-1))
        self.next_button.clicked.connect(lambda: self.browser.step(+1))
        self.index_spin.valueChanged.connect(self.browser.set_index)
        self.filter_combo.currentIndexChanged.connect(
            lambda _row: self.browser.set_filter(self.filter_combo.currentData())
        )
        self.show_combo.currentIndexChanged.connect(
            lambda _row: (
                self.show_combo.currentData() and self.browser.set_show(self.show_combo.currentData())
            )
        )
        return self.browse_box

    def set_loading(self, text: str | None) -> None:
        """Opening a dataset (``text`` says what), or done (None)."""
        for b in (self.open_file_button, self.open_folder_button, self.sample_button):
            b.setEnabled(text is None)
        if text is not None:
            self.summary.setText(text)

    # -- redrawing ---------------------------------------------------------------
    def _on_dataset_changed(self) -> None:
        b = self.browser
        loaded = b.loaded and b.stats is not None
        for box in (self.browse_box, self.balance_box, self.dup_box):
            box.setEnabled(loaded)
        for combo in (self.filter_combo, self.show_combo):
            combo.blockSignals(True)
            combo.clear()
        self.dup_list.clear()
        if not loaded:
            self.summary.setText(EMPTY_TEXT)
            self.filter_combo.blockSignals(False)
            self.show_combo.blockSignals(False)
            return
        n, labelled = len(b), b.stats.images
        h, w = b.masks.shape[1:]
        pool = (
            f", {b.n_test} unlabelled ({len(b.pool_labelled)} labelled since)" if b.pool_labelled
            else f", {b.n_test} unlabelled" if b.n_test else ""
        )  # fmt: skip
        if is_stack(b.masks):  # a converted dataset read from disk
            sizes = len({tuple(v) for v in b.masks.sizes.tolist()})
            size = f"up to {h}x{w} ({sizes} sizes)" if sizes > 1 else f"{h}x{w}"
            self.summary.setText(
                f"<b>{source_title(b.source)}</b>: {b.n_labelled} labelled frames of {size}{pool}, "
                "read from disk as they are shown"
            )
        else:
            self.summary.setText(
                f"<b>{source_title(b.source)}</b>: {b.n_labelled} labelled images of {h}x{w}{pool}"
            )
        unlabelled = b.n_test - len(b.pool_labelled)
        for mode, count in (("labelled", labelled), ("unlabelled", unlabelled), ("all", n)):
            self.show_combo.addItem(f"{mode} ({count})", mode)
        self.show_combo.setCurrentIndex(self.show_combo.findData(b.show))
        self.show_combo.setEnabled(b.n_test > 0)
        self.show_combo.blockSignals(False)
        self.index_spin.blockSignals(True)
        self.index_spin.setRange(0, n - 1)
        self.index_spin.setValue(b.index)
        self.index_spin.blockSignals(False)
        self._show_count()
        self.filter_combo.addItem("any class", None)
        for c in b.classes:
            self.filter_combo.addItem(f"{c.name} ({int(b.presence[:, c.id].sum())})", c.id)
        for bars in (self.share_bars, self.presence_bars, self.composition_bars):
            bars.set_classes(b.classes)
        self.filter_combo.blockSignals(False)
        classes = b.stats.classes
        self.share_bars.set_values([c.share for c in classes], [percent(c.share) for c in classes])
        self.presence_bars.set_values(
            [c.images for c in classes],
            [f"{c.images} ({100 * c.images / max(labelled, 1):.0f}%)" for c in classes],
        )
        groups = b.stats.duplicate_mask_groups
        self.dup_hint.setText(
            f"{len(groups)} group(s) of images share an identical mask: often pasted-in "
            "outliers or copied labels. Click a group to step through it."
            if groups
            else "This dataset is read from disk: Rank in the Review tab finds duplicate masks (it reads them all)."
            if is_stack(b.masks)
            else "No two images have identical masks."
        )
        for g in groups:
            shown = ", ".join(map(str, g[:8])) + (", …" if len(g) > 8 else "")
            item = QListWidgetItem(f"{len(g)} images: {shown}")
            item.setData(256, list(g))  # Qt.UserRole
            self.dup_list.addItem(item)
        self.show_index(b.index)

    def _on_show_changed(self, show: str) -> None:
        self.show_combo.blockSignals(True)
        self.show_combo.setCurrentIndex(self.show_combo.findData(show))
        self.show_combo.blockSignals(False)
        self._show_count()

    def show_index(self, index: int) -> None:
        b = self.browser
        if not b.loaded:
            return
        self.index_spin.blockSignals(True)
        self.index_spin.setValue(index)
        self.index_spin.blockSignals(False)
        comp = b.composition(index)
        self.composition_bars.set_values(comp, [percent(v) for v in comp])
        group = b.group_of(index)
        extra = f" · shares its mask with {len(group) - 1} other image(s)" if group else ""
        if b.is_unlabelled(index):
            extra = " · unlabelled: paint its classes (or start from the prediction) and save to train on it"
        elif index >= b.n_labelled:
            extra = " · labelled here (was unlabelled)"
        self.image_label.setText(f"{b.image_title(index)}{extra}")
        self._show_count()

    def _show_count(self) -> None:
        if self.browser.loaded:
            self.count_label.setText(self.browser.count_text())


def source_title(source: str) -> str:
    if source.startswith("synthetic:"):
        parts = source.split(":")
        return f"Synthetic Mars sample (seed {parts[2]})" if len(parts) > 2 else "Synthetic Mars sample"
    return Path(source).name or source


def percent(share: float) -> str:
    if share == 0:
        return "0%"
    if share < 0.001:
        return "<0.1%"
    return f"{100 * share:.1f}%" if share < 0.1 else f"{100 * share:.0f}%"
