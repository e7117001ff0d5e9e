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


def review(viewer, widget, minutes: float) -> None:
    """Rank the sample's masks in the Review tab and show the first misaligned one."""
    panel, model = widget.review, widget.session.review
    widget.dataset_panel.filter_combo.setCurrentIndex(0)
    widget.tabs.setCurrentIndex(2)
    done = []
    model.audit_done.connect(done.append)
    panel.start_audit(minutes=minutes)
    start = time.time()
    while not done and time.time() - start < minutes * 60 + 120:
        settle(0.2)
    for row, entry in enumerate(model.queue):
        if entry.move is not None:
            panel.queue.setCurrentRow(row)
            model.go_to(entry)
            break
    settle()


def label_next(out: str, train_seconds: float) -> None:
    """A synthetic file with unlabelled images: train, rank them, start one from the prediction."""
    from trainer.formats import write_npz
    from trainer.synth import generate

    tmp = Path(tempfile.mkdtemp())
    ds = generate(300, 300, seed=1).dataset
    write_npz(tmp / "rover_traverse.npz", ds.images, ds.masks, ds.test_images, dtype="uint8")
    viewer = napari.Viewer(title="Mars Viewer")
    _, widget = viewer.window.add_plugin_dock_widget("marsviewer", "Mars Viewer")
    viewer.window._qt_window.resize(1400, 950)
    widget.open_path(tmp / "rover_traverse.npz")
    while widget.loading:
        settle(0.1)
    session, panel = widget.session, widget.training
    session.training.runs_root = tmp / "runs"
    panel.form.preset.value = "cpu"
    panel.form.device.value = "cpu"
    panel.form.editors["epochs"].value = 0
    panel.form.editors["minutes"].value = train_seconds / 60
    panel.start()
    while session.training.running:
        settle(0.2)
    widget.tabs.setCurrentIndex(3)
    widget.label_next.start()
    while session.label_next.job is not None:
        settle(0.2)
    widget.label_next.queue.setCurrentRow(0)
    session.label_next.go_to(session.label_next.entries[0])
    session.label_next.start_from_prediction()
    while session.label_next.seed is not None:
        settle(0.2)
    viewer.layers["prediction"].visible = False
    viewer.reset_view()
    settle(1.0)
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(out)
    session.shutdown()
    viewer.close()


def main(out: str, train_seconds: float = 0.0, review_minutes: float = 0.0) -> None:
    viewer = napari.Viewer(title="Mars Viewer")
    _, widget = viewer.window.add_plugin_dock_widget("marsviewer", "Mars Viewer")
    widget.load_sample()
    start = time.time()
    while not widget.browser.loaded and time.time() - start < 60:
        settle(0.05)
    viewer.window._qt_window.resize(1400, 950)
    settle()
    # Show an image with the rare class, found through the class filter.
    combo = widget.dataset_panel.filter_combo
    combo.setCurrentIndex(combo.findData(4))
    viewer.reset_view()
    settle()
    if train_seconds:
        panel = widget.training
        widget.session.training.runs_root = Path(tempfile.mkdtemp())
        panel.form.preset.value = "cpu"
        panel.form.device.value = "cpu"
        widget.tabs.setCurrentIndex(1)
        widget.images_layer.visible = True
        widget.masks_layer.visible = False
        panel.start()
        settle(train_seconds)
        viewer.layers["prediction"].opacity = 0.5
        settle()
    if review_minutes:
        review(viewer, widget, review_minutes)
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(out)
    widget.session.shutdown()
    viewer.close()


if __name__ == "__main__":
    # python docs/screenshot.py OUT.png [SECONDS]: with SECONDS, train that long first.
    # python docs/screenshot.py OUT.png review [MINUTES]: rank the masks in the Review tab.
    # python docs/screenshot.py OUT.png label-next [SECONDS]: unlabelled images and the queue.
    args = sys.argv[1:]
    if len(args) > 1 and args[1] == "label-next":
        label_next(args[0], float(args[2]) if len(args) > 2 else 60.0)
    elif len(args) > 1 and args[1] == "review":
        main(args[0], review_minutes=float(args[2]) if len(args) > 2 else 3.0)
    else:
        main(args[0] if args else "screenshot.png", float(args[1]) if len(args) > 1 else 0.0)
