"""Data larger than memory: convert, train from disk by crops, predict a large frame.

Generates a folder of FRAMES synthetic Mars frames of SIZE x SIZE (PNG images and masks,
made of synthetic scenes side by side), then measures, each part in its own process so
that its peak memory (max RSS) is its own:

* ``convert``: ``mars-trainer convert`` of the folder: images/s and peak RSS;
* ``train_disk``: training from the zarr dataset on 256x256 crops read by threads;
  ``train_memory``: the same model and crops from frames held in memory (enough frames
  that neither side ends an epoch, and so validates, inside the measured steps); ROUNDS
  of each, alternated; ``disk_vs_memory`` = mean img/s from disk / mean img/s from memory;
* ``predict``: a 4096x4096 frame predicted by tiles (seconds), and the agreement of a
  tiled and a whole-image prediction of a 1024x1024 frame;
* ``napari``: the main widget opens the dataset (lazily: frames read as they are shown),
  browses BROWSE_STEPS frames (median and worst step), paints on one and saves it;
  seconds and peak RSS. Needs a display (``make bench`` runs it under Xvfb).

    python bench/scale.py [--frames 3000] [--size 1024] [--steps 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import report

BATCH = 8
ROUNDS = 2
BROWSE_STEPS = 60


def memory_frames(steps: int) -> int:
    """Frames held in memory: one epoch outlasts the warm-up and the measured steps."""
    return int(np.ceil(BATCH * (steps + 5) / 0.98)) + 1


def make_frames(root: Path, frames: int, size: int, seed: int = 0) -> None:
    from PIL import Image

    from trainer.synth import generate

    scenes = generate(256, 0, seed=seed).dataset
    rng = np.random.default_rng(seed)
    h, w = scenes.image_shape
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for f in range(frames):
        pick = rng.integers(0, len(scenes), (size // h, size // w))
        image = np.block([[scenes.images[k] for k in row] for row in pick])
        mask = np.block([[scenes.masks[k] for k in row] for row in pick])
        Image.fromarray(image).save(root / "images" / f"frame{f:05d}.png", compress_level=1)
        Image.fromarray(mask).save(root / "masks" / f"frame{f:05d}.png", compress_level=1)


def run_part(args: list[str]) -> tuple[dict, float]:
    """Run this script's ``--part`` in a child; (its JSON, its peak RSS in MB)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"part {args} failed")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def part_train(store: str, steps: int, memory: bool) -> dict:
    import torch

    from trainer.config import preset
    from trainer.engine import TrainControl, fit
    from trainer.formats import open_zarr

    stored = open_zarr(store)
    if memory:  # the same crops of frames held in memory
        from trainer.dataset import Dataset

        n = memory_frames(steps)
        dataset = Dataset(images=np.asarray(stored.images[:n]), masks=np.asarray(stored.masks[:n]))
    else:
        dataset = stored
    cfg = preset("cpu").replace(tile=256, batch_size=BATCH, epochs=1, val_fraction=0.02, device="cpu")
    control = TrainControl()
    rates, t0 = [], None
    for event in fit(dataset, cfg, None, control=control):
        if event.kind == "step":
            if event.step == 3:
                t0 = time.perf_counter()
            elif t0 is not None:
                rates.append(event.step)
            if event.step >= steps + 3:
                control.request_stop()
    seconds = time.perf_counter() - t0
    return {"images_per_s": round(BATCH * (rates[-1] - 3) / seconds, 2), "threads": torch.get_num_threads()}


def part_predict(store: str) -> dict:
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.config import preset
    from trainer.engine import TrainControl, fit
    from trainer.formats import open_zarr
    from trainer.tiling import predict_any, predict_tiled

    stored = open_zarr(store)
    cfg = preset("cpu").replace(tile=256, batch_size=8, epochs=1, val_fraction=0.02, device="cpu")
    control = TrainControl()
    with tempfile.TemporaryDirectory() as run:  # a model that has learnt something: 40 steps
        for event in fit(stored, cfg.replace(epochs=100), run, control=control):
            if event.kind == "step" and event.step >= 40:
                control.request_stop()
            if event.kind == "stopped":
                model, _ = model_from_checkpoint(load_checkpoint(event.checkpoint))
    model.eval()
    frame = stored.image(0)
    big = np.tile(frame, (4096 // frame.shape[0] + 1, 4096 // frame.shape[1] + 1))[:4096, :4096]
    t = time.perf_counter()
    probs = predict_tiled(model, big)
    seconds = time.perf_counter() - t
    whole = predict_any(model, frame, whole_pixels=frame.size)
    tiled = predict_tiled(model, frame, tile=256)
    return {
        "predict_4096_s": round(seconds, 1),
        "predict_shape": list(probs.shape[1:]),
        "agreement_tiled_whole": round(float((whole.argmax(0) == tiled.argmax(0)).mean()), 4),
        "agreement_frame": list(frame.shape),
    }


def part_napari(store: str) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    from marsviewer._widget import MarsViewerWidget

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    widget = MarsViewerWidget(viewer)
    viewer.window.add_dock_widget(widget)
    app.processEvents()
    t = time.perf_counter()
    widget.open_path(store)
    while widget.loading or not widget.browser.loaded:
        app.processEvents()
        time.sleep(0.005)
    app.processEvents()
    open_s = time.perf_counter() - t
    lazy = type(widget.masks_layer.data).__name__ == "FrameStack"
    steps = []
    rng = np.random.default_rng(0)
    n = len(widget.browser)
    for row in rng.choice(n, min(n, BROWSE_STEPS), replace=False):  # no frame twice: read from disk
        t = time.perf_counter()
        viewer.dims.set_current_step(0, int(row))
        app.processEvents()
        steps.append(time.perf_counter() - t)
    layer = widget.masks_layer
    layer.selected_label = 4
    t = time.perf_counter()
    layer.paint((widget.browser.index, 100, 100), 4)
    saved = widget.session.review.save()
    save_s = time.perf_counter() - t
    widget.session.shutdown()
    viewer.close()
    return {
        "napari_lazy": lazy,
        "napari_open_s": round(open_s, 2),
        "napari_browse_median_ms": round(1000 * float(np.median(steps)), 1),
        "napari_browse_worst_ms": round(1000 * float(np.max(steps)), 1),
        "napari_browse_steps": len(steps),
        "napari_paint_save_s": round(save_s, 3) if saved else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json")
    p.add_argument("--part", choices=["train_disk", "train_memory", "predict", "napari"])
    p.add_argument("--store")
    args = p.parse_args()
    if args.part:
        parts = {
            "predict": lambda: part_predict(args.store),
            "napari": lambda: part_napari(args.store),
            "train_disk": lambda: part_train(args.store, args.steps, memory=False),
            "train_memory": lambda: part_train(args.store, args.steps, memory=True),
        }
        print(json.dumps(parts[args.part]()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_frames(tmp / "src", args.frames, args.size)
        generated_s = time.perf_counter() - t
        store = tmp / "d.zarr"
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "convert", str(tmp / "src"), "--out", str(store)],
                                stdout=subprocess.DEVNULL)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        convert_s = time.perf_counter() - t
        if status:
            raise SystemExit("convert failed")
        raw_gb = args.frames * args.size * args.size * 2 / 1e9
        os.sync()  # the frames just written are on disk: no write-back under the training
        runs = {"train_disk": [], "train_memory": []}
        for _ in range(ROUNDS):  # alternated, so that a busy moment of the machine hits both
            for part in runs:
                runs[part].append(
                    run_part(["--part", part, "--store", str(store), "--steps", str(args.steps)])
                )
        disk_rates = [r["images_per_s"] for r, _ in runs["train_disk"]]
        memory_rates = [r["images_per_s"] for r, _ in runs["train_memory"]]
        disk = {"images_per_s": round(float(np.mean(disk_rates)), 2)}
        memory = {"images_per_s": round(float(np.mean(memory_rates)), 2)}
        disk_rss = max(rss for _, rss in runs["train_disk"])
        memory_rss = max(rss for _, rss in runs["train_memory"])
        predicted, predict_rss = run_part(["--part", "predict", "--store", str(store)])
        viewer, viewer_rss = run_part(["--part", "napari", "--store", str(store)])
    result = {
        "frames": args.frames,
        "size": args.size,
        "dataset_gb": round(raw_gb, 2),
        "generate_s": round(generated_s, 1),
        "convert_images_per_s": round(args.frames / convert_s, 1),
        "convert_peak_rss_mb": round(usage.ru_maxrss / 1024),
        "train_tile": 256,
        "train_batch": BATCH,
        "train_disk_images_per_s": disk["images_per_s"],
        "train_memory_images_per_s": memory["images_per_s"],
        "disk_vs_memory": round(disk["images_per_s"] / memory["images_per_s"], 3),
        "train_rounds": ROUNDS,
        "train_disk_runs": disk_rates,
        "train_memory_runs": memory_rates,
        "train_disk_peak_rss_mb": round(disk_rss),
        "train_memory_peak_rss_mb": round(memory_rss),
        "memory_frames": memory_frames(args.steps),
        **predicted,
        "predict_peak_rss_mb": round(predict_rss),
        **viewer,
        "napari_peak_rss_mb": round(viewer_rss),
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
