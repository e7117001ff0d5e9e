"""Take the README screenshot: napari with the Mars Viewer widget on the synthetic sample.

Run under a display, e.g. ``xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot.py OUT.png``
(``make screenshot`` does that).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import napari
from PIL import Image
from qtpy.QtWidgets import QApplication


def settle(seconds: float = 0.3) -> None:
    end = time.time() + seconds
    while time.time() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def main(out: str, train_seconds: float = 0.0) -> None:
    viewer = napari.Viewer(title="Mars Viewer")
    _, widget = viewer.window.add_plugin_dock_widget("marsviewer", "Mars Viewer")
    widget.load_sample()
    start = time.time()
    while not widget.browser.loaded and time.time() - start < 60:
        settle(0.05)
    viewer.window._qt_window.resize(1400, 950)
    settle()
    # Show an image with the rare class, found through the class filter.
    widget.filter_combo.setCurrentIndex(widget.filter_combo.findData(4))
    viewer.reset_view()
    settle()
    if train_seconds:
        panel = widget.training
        panel.runs_root = Path(tempfile.mkdtemp())
        panel.form.preset_combo.setCurrentText("cpu")
        panel.form.device_combo.setCurrentIndex(panel.form.device_combo.count() - 1)
        widget.tabs.setCurrentIndex(1)
        widget.images_layer.visible = True
        widget.masks_layer.visible = False
        panel.start()
        settle(train_seconds)
        viewer.layers["prediction"].opacity = 0.5
        settle()
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(out)
    if train_seconds:
        widget.training.shutdown()
    viewer.close()


if __name__ == "__main__":
    # python docs/screenshot.py OUT.png [SECONDS]: with SECONDS, train that long first.
    main(
        sys.argv[1] if len(sys.argv) > 1 else "screenshot.png",
        float(sys.argv[2]) if len(sys.argv) > 2 else 0.0,
    )
