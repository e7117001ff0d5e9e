"""Large frames against small images: training speed per pixel and peak memory.

A folder of FRAMES synthetic frames of 500x560 (PNG images and masks labelled soil
against big rock, as rover frames often are) is trained on 256x256 crops, as
``mars-trainer train FOLDER --tile 256`` does; the competition's 64x128 images are
trained whole. Each case runs in its own process (so its peak memory, max RSS, is its
own), ROUNDS times, the cases alternated; a case's speed is the median of its rounds,
measured over STEPS steps after WARMUP (training steps: no validation runs among them):

* ``small``: 3,000 synthetic 64x128 images, the ``cpu`` preset (batch 32);
* ``crops``: the frames by crops of 256x256, the ``cpu`` preset as it is (a step holds
  the pixels of 32 small images: 4 crops);
* ``crops_32``: the same with 32 crops a step (``--crop-batch 32``), as every step of crops
  was before.

``crops_vs_small`` is the pixel rate of ``crops`` over that of ``small`` (pixels per second,
64x128 = 8,192 pixels an image, 256x256 = 65,536 a crop).

    python bench/crop_rate.py [--frames 100] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import report

FRAME = (500, 560)
TILE = 256
WARMUP = 5
STEPS = {"small": 40, "crops": 60, "crops_32": 12}  # about the same seconds each


def make_frames(root: Path, n: int) -> None:
    from PIL import Image

    from trainer.synth import Site, generate

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ds = generate(
        n, 0, seed=5, shape=FRAME, plant_problems=False, site=Site(rock_rate=0.8), labels="soil-rock"
    )
    ds = ds.dataset
    for i in range(n):
        Image.fromarray(ds.images[i]).save(root / "images" / f"frame{i:03d}.png")
        Image.fromarray(ds.masks[i]).save(root / "masks" / f"frame{i:03d}.png")


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM: ``getrusage``'s
    ``ru_maxrss`` keeps the peak of the process that forked it, across exec, on Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(case: str, folder: str) -> dict:
    """One case in this process: pixels/s over the measured steps, and the peak RSS."""
    from trainer import events as ev
    from trainer.config import preset
    from trainer.engine import fit
    from trainer.formats import open_dataset
    from trainer.synth import generate

    # Training steps only: no validation inside the measured steps (an epoch of crops is a
    # few dozen steps; one of 3,000 small images is more than the steps measured).
    cfg = preset("cpu").replace(log_every=1, minutes=0.0, val_every=1000)
    if case == "small":
        ds, cfg, pixels = (
            generate(3000, 0, seed=1, plant_problems=False).dataset,
            cfg.replace(epochs=1),
            64 * 128,
        )
    else:
        ds = open_dataset(folder)
        cfg = cfg.replace(tile=TILE, epochs=50, crop_batch=32 if case == "crops_32" else 0)
        pixels = TILE * TILE
    steps, seen, t0, s0, data = STEPS[case], 0, None, 0, ""
    for e in fit(ds, cfg):
        if isinstance(e, ev.Started):
            data = e.data
        elif isinstance(e, ev.Step):
            seen += 1
            now = time.perf_counter()
            if seen == WARMUP:
                t0, s0 = now, e.step
            if seen == WARMUP + steps:
                step_images = (e.step - s0) * _batch(data, cfg)
                rate = step_images / (now - t0)
                break
    return {
        "images_per_s": round(rate, 2),
        "pixels_per_s": round(rate * pixels),
        "peak_rss_mb": round(peak_rss_mb()),
        "data": data,
        "steps": steps,
    }


def _batch(data: str, cfg) -> int:
    """Images a step, as the run said it (crops: "(4 a step ...)")."""
    if "crops (" in data:
        return int(data.split("crops (", 1)[1].split(" a step", 1)[0])
    return cfg.batch_size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.folder)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "frames"
        make_frames(folder, args.frames)
        runs: dict[str, list[dict]] = {case: [] for case in STEPS}
        for _ in range(args.rounds):
            for case in STEPS:
                out = subprocess.run(
                    [sys.executable, __file__, "--case", case, "--folder", str(folder)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(case, runs[case][-1], file=sys.stderr, flush=True)

    def median(case: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[case])

    result = {
        "frames": args.frames,
        "frame": list(FRAME),
        "tile": TILE,
        "rounds": args.rounds,
        "cases": {
            case: {
                "pixels_per_s": median(case, "pixels_per_s"),
                "images_per_s": median(case, "images_per_s"),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[case]),
                "data": runs[case][0]["data"],
                "steps": runs[case][0]["steps"],
                "pixels_per_s_each": [r["pixels_per_s"] for r in runs[case]],
            }
            for case in STEPS
        },
    }
    small = result["cases"]["small"]["pixels_per_s"]
    result["crops_vs_small"] = round(result["cases"]["crops"]["pixels_per_s"] / small, 3)
    result["crops_32_vs_small"] = round(result["cases"]["crops_32"]["pixels_per_s"] / small, 3)
    result["ratio_each_round"] = [
        round(c["pixels_per_s"] / s["pixels_per_s"], 3)
        for c, s in zip(runs["crops"], runs["small"], strict=True)
    ]
    report(result, args.json)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
