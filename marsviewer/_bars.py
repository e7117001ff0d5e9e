"""A small painted bar chart with one row per terrain class (also serves as the legend)."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from trainer.classes import CLASSES

ROW_HEIGHT = 20
NAME_WIDTH = 86
VALUE_WIDTH = 92


class ClassBars(QWidget):
    """Horizontal bars in the class colours: swatch, class name, bar, value text.

    Painting a handful of rectangles is far cheaper than a plotting library, so the
    view can be redrawn on every browse step without slowing browsing down.
    """

    def __init__(self, title: str = "", parent=None) -> None:
        super().__init__(parent)
        self.title = title
        self.classes = CLASSES  # the rows: the dataset's class table
        self.values: list[float] = [0.0] * len(CLASSES)
        self.texts: list[str] = [""] * len(CLASSES)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setMinimumWidth(240)
        self.setMinimumHeight(self.sizeHint().height())

    def sizeHint(self) -> QSize:
        return QSize(300, self._top() + ROW_HEIGHT * len(self.classes) + 4)

    def minimumSizeHint(self) -> QSize:
        return self.sizeHint()

    def _top(self) -> int:
        return ROW_HEIGHT if self.title else 2

    def set_classes(self, classes) -> None:
        """One row per class of ``classes`` (a dataset's table) from now on."""
        if tuple(classes) != tuple(self.classes):
            self.classes = classes
            self.setMinimumHeight(self.sizeHint().height())
            self.updateGeometry()
            self.update()

    def set_values(self, values: Sequence[float], texts: Sequence[str]) -> None:
        self.values = [float(v) for v in values]
        self.texts = list(texts)
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing, False)
        fg = self.palette().color(self.foregroundRole())
        if self.title:
            p.setPen(fg)
            p.drawText(QRectF(0, 0, self.width(), ROW_HEIGHT), Qt.AlignLeft | Qt.AlignVCenter, self.title)
        top = self._top()
        bar_x = 16 + NAME_WIDTH
        bar_w = max(self.width() - bar_x - VALUE_WIDTH, 20)
        peak = max(max(self.values, default=0.0), 1e-12)
        for row, cls in enumerate(self.classes):
            y = top + row * ROW_HEIGHT
            color = QColor(*cls.color)
            p.setPen(QPen(fg, 1) if cls.id == 0 else Qt.NoPen)
            p.setBrush(color)
            p.drawRect(QRectF(2, y + 5, 10, 10))
            p.setPen(fg)
            p.drawText(QRectF(16, y, NAME_WIDTH, ROW_HEIGHT), Qt.AlignLeft | Qt.AlignVCenter, cls.name)
            value = self.values[row] if row < len(self.values) else 0.0
            width = bar_w * value / peak
            if value > 0:
                width = max(width, 1.5)  # a rare class must still show
            p.setPen(Qt.NoPen)
            p.setBrush(color)
            p.drawRect(QRectF(bar_x, y + 4, width, ROW_HEIGHT - 8))
            p.setPen(fg)
            text = self.texts[row] if row < len(self.texts) else ""
            p.drawText(
                QRectF(bar_x + bar_w + 4, y, VALUE_WIDTH - 4, ROW_HEIGHT),
                Qt.AlignRight | Qt.AlignVCenter,
                text,
            )
        p.end()
