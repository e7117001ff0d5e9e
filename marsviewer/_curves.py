"""A small painted line chart for live training curves (cheap enough to redraw often)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget


class CurvePlot(QWidget):
    """Several named series over a shared x axis (training steps), with a legend."""

    def __init__(self, title: str, y_range: tuple[float, float] | None = None, parent=None) -> None:
        super().__init__(parent)
        self.title = title
        self.y_range = y_range
        self.series: list[tuple[str, QColor, Sequence[float], Sequence[float]]] = []
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setMinimumHeight(130)

    def sizeHint(self) -> QSize:
        return QSize(300, 140)

    def set_series(
        self, series: list[tuple[str, tuple[int, int, int], Sequence[float], Sequence[float]]]
    ) -> None:
        self.series = [(name, QColor(*rgb), list(xs), list(ys)) for name, rgb, xs, ys in series]
        self.update()

    def _bounds(self):
        xs = [x for _, _, sx, _ in self.series for x in sx]
        ys = [y for _, _, _, sy in self.series for y in sy if not math.isnan(y)]
        if not xs or not ys:
            return None
        x0, x1 = min(xs), max(xs)
        if self.y_range:
            y0, y1 = self.y_range
        else:
            y0, y1 = min(ys), max(ys)
            pad = (y1 - y0) * 0.08 or 0.1
            y0, y1 = y0 - pad, y1 + pad
        return x0, max(x1, x0 + 1), y0, y1

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing, True)
        fg = self.palette().color(self.foregroundRole())
        left, top, right, bottom = 34, 26, 8, 16  # the top tick label sits below the title
        plot = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
        p.setPen(fg)
        p.drawText(QRectF(0, 0, self.width(), top - 10), Qt.AlignLeft | Qt.AlignVCenter, self.title)
        grid = QColor(fg)
        grid.setAlpha(60)
        p.setPen(QPen(grid, 1))
        p.drawRect(plot)
        bounds = self._bounds()
        if bounds is None:
            p.setPen(fg)
            p.drawText(plot, Qt.AlignCenter, "no data yet")
            p.end()
            return
        x0, x1, y0, y1 = bounds
        p.setPen(fg)
        for frac in (0.0, 0.5, 1.0):
            y = y0 + (y1 - y0) * frac
            py = plot.bottom() - frac * plot.height()
            p.drawText(QRectF(0, py - 8, left - 4, 16), Qt.AlignRight | Qt.AlignVCenter, f"{y:.2g}")
        p.drawText(
            QRectF(plot.left(), plot.bottom(), plot.width(), bottom),
            Qt.AlignRight | Qt.AlignVCenter,
            f"step {int(x1)}",
        )

        def to_px(x: float, y: float) -> QPointF:
            fx = (x - x0) / (x1 - x0)
            fy = (y - y0) / (y1 - y0) if y1 > y0 else 0.5
            return QPointF(
                plot.left() + fx * plot.width(), plot.bottom() - min(max(fy, 0), 1) * plot.height()
            )

        legend_x = plot.left() + 4
        for name, color, xs, ys in self.series:
            path = QPainterPath()
            started = False
            for x, y in zip(xs, ys, strict=False):
                if math.isnan(y):
                    started = False
                    continue
                pt = to_px(x, y)
                if started:
                    path.lineTo(pt)
                else:
                    path.moveTo(pt)
                    started = True
            p.setPen(QPen(color, 2))
            p.setBrush(Qt.NoBrush)
            p.drawPath(path)
            if len(xs) == 1 and not math.isnan(ys[0]):
                p.drawEllipse(to_px(xs[0], ys[0]), 2.5, 2.5)
            if len(self.series) > 1:
                p.drawText(QRectF(legend_x, plot.top() + 2, 80, 14), Qt.AlignLeft | Qt.AlignVCenter, name)
                legend_x += p.fontMetrics().horizontalAdvance(name) + 10
        p.end()
