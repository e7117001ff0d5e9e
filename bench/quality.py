"""What each training ingredient buys: per-class IoU on a held-out split of synthetic Mars.

Every variant trains for the same number of epochs on the same images and is scored on
the same held-out split (the split depends only on the data and the seed) at its last
epoch: no epoch is picked on the images it is scored on. A fixed number of steps rather
than minutes keeps the figures independent of machine load. From a plain baseline,
ingredients are added one at a time to the ``cpu`` preset's U-Net:

1. baseline: unweighted cross-entropy (background included), no augmentation, no oversampling
2. + background weight 0 (the metric ignores background)
3. + class weights (sqrt inverse frequency) and Dice
4. + on-device augmentation
5. + oversampling of images with rare classes  (= the default ``cpu`` preset)

then the ``cpu`` preset in fp32 (bf16 must not cost quality beyond seed noise), the
``course`` preset (a course team's published recipe) and the ``gpu`` preset, on the same
data and the same number of epochs.

    python bench/quality.py [--images 1000] [--epochs 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from _report import report

from trainer import events as ev
from trainer.config import preset
from trainer.engine import fit
from trainer.synth import generate

VARIANTS = [
    (
        "baseline",
        dict(loss="ce:1", background_weight=1.0, class_weighting="none", augment=False, oversample=0.0),
    ),
    ("+ background weight 0", dict(loss="ce:1", class_weighting="none", augment=False, oversample=0.0)),
    ("+ class weights, Dice", dict(augment=False, oversample=0.0)),
    ("+ augmentation", dict(oversample=0.0)),
    ("+ oversampling (cpu preset)", dict()),
    ("cpu preset in fp32", dict(precision="fp32")),
    ("course preset (depth-4 U-Net, focal Tversky)", "course"),
    ("gpu preset (depth 4, width 32, SE blocks)", "gpu"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    dataset = generate(args.images, 0, seed=args.seed).dataset
    rows = []
    for name, changes in VARIANTS:
        if isinstance(changes, str):
            cfg = preset(changes).replace(epochs=args.epochs, seed=args.seed, device="cpu")
        else:
            cfg = preset("cpu").replace(epochs=args.epochs, seed=args.seed, **changes)
        cfg = cfg.replace(val_every=args.epochs)  # one validation: the last epoch's
        t0 = time.perf_counter()
        last, started = None, None
        for e in fit(dataset, cfg):
            if isinstance(e, ev.Started):
                started = e
            if isinstance(e, ev.Validation):
                last = e
        row = {
            "variant": name,
            "miou": last.miou,
            "miou_keras": last.miou_keras,
            "iou": last.iou,
            "epochs": last.epoch + 1,
            "steps": last.step,
            "batch_size": cfg.batch_size,
            "warmup_steps": cfg.warmup_steps,
            "precision": started.precision,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = ["Soil", "Bedrock", "Sand", "Big Rock"]
    print()
    print(f"| variant | {' | '.join(names)} | mIoU (1-4) |")
    print("| --- |" + " ---: |" * (len(names) + 1))
    for r in rows:
        cells = ["-" if v is None or math.isnan(v) else f"{v:.3f}" for v in r["iou"][1:]]
        print(f"| {r['variant']} | {' | '.join(cells)} | **{r['miou']:.3f}** |")
    result = {
        "images": args.images,
        "epochs": args.epochs,
        "seed": args.seed,
        "results": rows,
    }
    if args.json:
        report(result, args.json, echo=False)  # the rows and the table are printed above


if __name__ == "__main__":
    main()
