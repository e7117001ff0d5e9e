"""Does a larger batch cost quality? A preset (``gpu`` on CUDA) trained at several batch
sizes on the same synthetic images for the same epochs (a larger batch makes fewer steps
an epoch), each run scored at its last epoch on the same held-out split, with its time.

On a GPU the ``gpu`` preset's whole pipeline runs faster at batch 256 than at its 128
(``train_throughput.py --device cuda``: ``cuda_pipeline_batch_img_s``), but an epoch of
the competition's 2,615 images is then 9 steps instead of 19. This says what that costs:
per batch, the mIoU of each seed, their mean, and the paired difference from the first
batch against the seed-to-seed spread; and the run's images a second (wall time of the
whole run: validations and start-up included).

    python bench/batch_quality.py --device cuda [--batches 128,256] [--seeds 0,1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

from _report import report

from trainer import events as ev
from trainer.config import preset
from trainer.device import device_name, resolve_device
from trainer.engine import fit
from trainer.synth import COMPETITION_IMAGES, generate


def train_once(dataset, cfg) -> dict:
    t0 = time.perf_counter()
    last = None
    for e in fit(dataset, cfg):
        if isinstance(e, ev.Validation):
            last = e
        elif isinstance(e, ev.Failed):
            raise RuntimeError(f"batch {cfg.batch_size}, seed {cfg.seed}: {e.message}")
    seconds = time.perf_counter() - t0
    return {
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "miou": round(last.miou, 4),
        "steps": last.step,
        "seconds": round(seconds, 1),
        "img_s": round(last.step * cfg.batch_size / seconds, 1),
    }


def summarise(rows: list[dict], batches: list[int]) -> list[dict]:
    """Per batch: each seed's mIoU, their mean, and the paired difference (same seed) from
    the first batch's."""
    by = {b: {r["seed"]: r for r in rows if r["batch_size"] == b} for b in batches}
    first = by[batches[0]]
    out = []
    for b in batches:
        runs = by[b]
        seeds = sorted(runs)
        out.append(
            {
                "batch_size": b,
                "miou": [runs[s]["miou"] for s in seeds],
                "mean_miou": round(statistics.fmean(runs[s]["miou"] for s in seeds), 4),
                "paired_difference": round(
                    statistics.fmean(runs[s]["miou"] - first[s]["miou"] for s in seeds), 4
                ),
                "steps": runs[seeds[0]]["steps"],
                "mean_seconds": round(statistics.fmean(runs[s]["seconds"] for s in seeds), 1),
                "mean_img_s": round(statistics.fmean(runs[s]["img_s"] for s in seeds), 1),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--images", type=int, default=COMPETITION_IMAGES)
    p.add_argument("--epochs", type=int, help="default: the preset's")
    p.add_argument("--batches", help="default: the preset's batch and twice it")
    p.add_argument("--seeds", default="0,1")
    p.add_argument(
        "--lr-scale",
        default="none",
        choices=["none", "sqrt", "linear"],
        help="the learning rate at a batch B times 1, sqrt(B / B0) or B / B0 (B0: the first batch)",
    )
    p.add_argument("--json")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    base = preset(name).replace(device=device.type)
    epochs = args.epochs or base.epochs
    batches = (
        [int(b) for b in args.batches.split(",")] if args.batches else [base.batch_size, 2 * base.batch_size]
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    dataset = generate(args.images, 0, seed=0).dataset  # the same images for every run
    rows = []
    for seed in seeds:
        for b in batches:
            scale = {"none": 1.0, "sqrt": math.sqrt(b / batches[0]), "linear": b / batches[0]}[args.lr_scale]
            cfg = base.replace(batch_size=b, seed=seed, epochs=epochs, val_every=epochs, lr=base.lr * scale)
            rows.append(train_once(dataset, cfg))
            print(json.dumps(rows[-1]), flush=True)
    spread = [r["miou"] for r in rows if r["batch_size"] == batches[0]]
    result = {
        "device": device_name(device),
        "preset": name,
        "images": args.images,
        "epochs": epochs,
        "seeds": seeds,
        "lr_scale": args.lr_scale,
        "runs": rows,
        "batches": summarise(rows, batches),
        # how far the first batch's mIoU moves from seed to seed: the noise a difference must beat
        "seed_spread": round(statistics.stdev(spread), 4) if len(spread) > 1 else None,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
