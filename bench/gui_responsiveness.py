"""Does training make napari stutter, and does training still get done? Browse like a
person while training runs.

Run under Xvfb on the target machine::

    xvfb-run -a -s "-screen 0 1600x1000x24" python bench/gui_responsiveness.py --json OUT

It opens the viewer with the plugin on the synthetic sample and moves to the next image
every ``--pace`` seconds (0.5: a person looking at each image), timing each move until the
viewer has processed it and repainted the canvas. Phases, one run:

1. idle (with the same layers as below: images, masks, prediction, uncertainty);
2. training started from the panel (default CPU preset, live previews on) in a child
   process: first nobody touches the viewer (``quiet``, alternated with the reference
   below), then someone browses, in blocks
   of ``--block`` seconds alternated with blocks where the training child is suspended
   the whole time (no CPU of its own: as idle as the viewer gets with a run open);
3. the baseline most plugins use: the same training in a thread inside napari's process.

Writes p99 and max step times of each, ``ratio_p99`` = p99 with training going over p99
with it suspended, from the alternated blocks (a shared machine's load drifts over minutes,
and the same idle phase measured minutes apart varied nearly twofold from run to run, so the two
sides of the ratio are measured in the same minutes), and ``ratio_p99_to_idle_before``
against phase 1 for reference; ``train_speed_quiet`` and ``train_speed_browsing``:
training steps per second with the viewer open and untouched, and over the blocks where
training went on while someone browsed, each over the same training's speed with nothing
drawn and no previews, in a reference child of its own run in blocks alternated with the
quiet ones (each child suspended while the other runs); and
``first_preview_s``, the time from Start to the first live prediction.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _report import report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    p.add_argument("--pace", type=float, default=0.5, help="seconds between browse steps")
    p.add_argument(
        "--block", type=float, default=5.0, help="seconds of each alternated block of the training phase"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads of the training (0 = the panel's default)"
    )
    p.add_argument("--no-preview", action="store_true", help="diagnostic: training without live previews")
    p.add_argument("--json")
    args = p.parse_args()

    import napari
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from trainer.config import preset
    from trainer.engine import TrainControl, fit
    from trainer.process import DatasetSpec  # noqa: F401 - imported here so phase 2 pays no import

    viewer = napari.Viewer(title="gui responsiveness")
    viewer.window._qt_window.resize(1400, 900)
    _, widget = viewer.window.add_plugin_dock_widget("marsviewer", "Mars Viewer")
    widget.load_sample()
    app = QApplication.instance()
    while not widget.browser.loaded:
        app.processEvents()
        time.sleep(0.01)
    canvas = viewer.window._qt_viewer.canvas.native
    n = len(widget.browser)

    def browse(seconds: float) -> list[float]:
        times = []
        i = widget.browser.index
        next_tick = time.perf_counter()
        end = next_tick + seconds
        while time.perf_counter() < end:
            next_tick += args.pace
            i = (i + 1) % n
            t0 = time.perf_counter()
            viewer.dims.set_current_step(0, i)
            app.processEvents()
            canvas.repaint()  # synchronous paint of the canvas
            times.append(1000 * (time.perf_counter() - t0))
            wait(next_tick - time.perf_counter())
        return times

    def wait(seconds: float) -> None:
        """Let Qt's event loop run for ``seconds``, sleeping when there is nothing to do, as
        it does for a person looking at the screen (a loop of ``processEvents`` and short
        sleeps would spend CPU of its own that training then lacks)."""
        if seconds <= 0:
            app.processEvents()
            return
        loop = QEventLoop()
        QTimer.singleShot(int(1000 * seconds), loop.quit)
        loop.exec()

    def summary(times: list[float]) -> tuple[float, float]:
        return float(np.percentile(times, 99)), float(np.max(times))

    panel, model = widget.training, widget.session.training
    # The prediction layers exist in every phase, so all phases draw the same layers and
    # the comparison measures only what training costs the viewer.
    widget.ensure_prediction_layers()
    browse(3)  # warm-up: shaders, caches
    idle = browse(args.seconds)

    def quiet_and_alone(reference: _Reference, seconds: float, block: float) -> tuple[float, float, float]:
        """Steps per second of the panel's run with the viewer open and untouched, and of
        the same training in a reference child with no viewer work, in alternated blocks
        (each child suspended while the other runs): host load falls alike on both. Also
        the viewer's own CPU time over wall time in the quiet blocks."""
        quiet, alone = [0, 0.0], [0, 0.0]
        cpu = 0.0
        for _ in range(max(1, round(seconds / block))):
            s0, t0, c0 = last_step(), time.perf_counter(), time.process_time()
            wait(block)
            quiet[0] += last_step() - s0
            quiet[1] += time.perf_counter() - t0
            cpu += time.process_time() - c0
            model.process.hold(0)
            reference.job.release()
            s0, t0 = reference.drain(), time.perf_counter()
            while time.perf_counter() - t0 < block:
                wait(0.1)
                reference.drain()
            alone[0] += reference.drain() - s0
            alone[1] += time.perf_counter() - t0
            reference.job.hold(0)
            model.process.release()
        return quiet[0] / quiet[1], alone[0] / alone[1], cpu / quiet[1]

    import marsviewer._session as session_module

    session = widget.session

    def last_step() -> int:
        app.processEvents()
        return model.record.steps[-1] if model.record.steps else 0

    def browse_suspended(seconds: float) -> list[float]:
        """Browse with the training child suspended the whole time (no CPU of its own):
        the session holds it as after any interaction, but does not let it go on."""
        quiet_s = session_module.QUIET_S
        session_module.QUIET_S = 1e9
        try:
            session.user_active()
            wait(args.pace)
            return browse(seconds)
        finally:
            session_module.QUIET_S = quiet_s
            session.user_active()  # released QUIET_S from now, as after any interaction
            wait(args.pace)

    def interleaved(seconds: float, block: float) -> tuple[list[float], list[float], float]:
        """Browse blocks of ``block`` seconds with training going and with training
        suspended, alternated over ``seconds`` each: a shared host's load, which drifts
        over minutes, falls alike on both sides of the ratio. Returns both step times and
        training's steps per second over the blocks where it went on."""
        going, held, steps, spent = [], [], 0, 0.0
        for _ in range(max(1, round(seconds / block))):
            s0, t0 = last_step(), time.perf_counter()
            going += browse(block)
            steps += last_step() - s0
            spent += time.perf_counter() - t0
            held += browse_suspended(block)
        return going, held, steps / spent

    panel.form.preset.value = "cpu"
    panel.form.device.value = "cpu"
    panel.form.editors["epochs"].value = 1000
    cfg_gui = panel.form.config()
    cfg_gui = (
        cfg_gui.replace(threads=args.threads, log_every=1) if args.threads else cfg_gui.replace(log_every=1)
    )
    if args.no_preview:
        import marsviewer._training_model as training_module

        training_module.PREVIEW_EVERY_S = None
    reference = _Reference(widget.session.training_data(), cfg_gui)
    panel.start(config=cfg_gui)
    # Equal phases: like the thread baseline below, timing starts once training has made
    # its first step (the child's start-up is not training).
    while not model.record.losses:
        app.processEvents()
        time.sleep(0.01)
    quiet_speed, alone, viewer_cpu = quiet_and_alone(reference, args.seconds, args.block)
    train, suspended, browsing_speed = interleaved(args.seconds, args.block)
    reference.job.close(timeout=10)
    first_preview = model.first_preview_s
    steps_in_process = len(model.record.losses)
    model.stop()
    while model.running:
        app.processEvents()
        time.sleep(0.02)

    control = TrainControl()
    spec = widget.session.training_data()
    from trainer.dataset import Dataset

    ds = Dataset(images=spec.images, masks=spec.masks, source="sample")
    cfg = preset("cpu").replace(epochs=1000, device="cpu", threads=args.threads or cfg_gui.threads)
    counter = {"steps": 0}

    def in_thread():
        for e in fit(ds, cfg, control=control):
            if e.kind == "step":
                counter["steps"] += 1
        return None

    worker = create_worker(in_thread, _start_thread=False, _ignore_errors=True)
    worker.start()
    while counter["steps"] == 0:
        app.processEvents()
        time.sleep(0.01)
    baseline = browse(args.seconds)
    control.request_stop()
    while worker.is_running:
        app.processEvents()
        time.sleep(0.02)

    idle_p99, idle_max = summary(idle)
    train_p99, train_max = summary(train)
    held_p99, held_max = summary(suspended)
    base_p99, base_max = summary(baseline)
    result = {
        "idle_p99_ms": round(idle_p99, 1),
        "idle_max_ms": round(idle_max, 1),
        "train_p99_ms": round(train_p99, 1),
        "train_max_ms": round(train_max, 1),
        "suspended_p99_ms": round(held_p99, 1),
        "suspended_max_ms": round(held_max, 1),
        "ratio_p99": round(train_p99 / held_p99, 3),
        "ratio_p99_to_idle_before": round(train_p99 / idle_p99, 3),
        "baseline_thread_p99_ms": round(base_p99, 1),
        "baseline_thread_max_ms": round(base_max, 1),
        "first_preview_s": None if first_preview is None else round(first_preview, 2),
        "pace_s": args.pace,
        "block_s": args.block,
        "train_steps_per_s_alone": round(alone, 3),
        "train_speed_quiet": round(quiet_speed / alone, 3),
        "train_speed_browsing": round(browsing_speed / alone, 3),
        "viewer_cpu_share_quiet": round(viewer_cpu, 3),
        "idle_median_ms": round(float(np.median(idle)), 1),
        "train_median_ms": round(float(np.median(train)), 1),
        "baseline_median_ms": round(float(np.median(baseline)), 1),
        "suspended_median_ms": round(float(np.median(suspended)), 1),
        "moves_per_phase": [len(idle), len(train), len(suspended), len(baseline)],
        "training_log_events_in_process_phase": steps_in_process,
        "training_steps_in_thread_phase": counter["steps"],
    }
    report(result, args.json)
    viewer.close()


class _Reference:
    """The same training in a child of its own, no previews and nothing drawn: the
    yardstick of the train_speed figures. Started before the panel's run, held (suspended)
    once it has made its first steps, and let go in blocks alternated with that run."""

    def __init__(self, spec, cfg) -> None:
        from trainer.process import TrainingProcess

        self.job = TrainingProcess(spec, cfg.replace(epochs=1000), None, preview_every_s=None)
        self.step = 0
        while self.drain() < 2:  # past start-up and the first step's allocations
            time.sleep(0.02)
        self.job.hold(0)

    def drain(self) -> int:
        """Read what the child sent; the number of its latest step."""
        from trainer import events as ev

        for e in self.job.events():
            if isinstance(e, ev.Step):
                self.step = e.step
            elif isinstance(e, ev.Failed):
                raise RuntimeError(e.message)
        return self.step


if __name__ == "__main__":
    main()
