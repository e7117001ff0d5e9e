"""Does bf16 cost quality? The ``cpu`` preset trained in bf16 and in fp32 with several
seeds on the same data: the difference between the two precisions is set against the
spread between seeds of one precision (the seed noise).

    python bench/precision_quality.py [--images 600] [--epochs 8] [--seeds 0,1,2] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics

from _report import report

from trainer import events as ev
from trainer.config import preset
from trainer.engine import fit
from trainer.synth import generate


def last_miou(dataset, cfg) -> float:
    last = None
    for e in fit(dataset, cfg):
        if isinstance(e, ev.Validation):
            last = e
    return last.miou


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--json")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    dataset = generate(args.images, 0, seed=0).dataset
    miou = {"bf16": [], "fp32": []}
    for seed in seeds:
        for precision in miou:
            cfg = preset("cpu").replace(
                epochs=args.epochs, seed=seed, precision=precision, val_every=args.epochs
            )
            miou[precision].append(round(last_miou(dataset, cfg), 4))
            print(precision, seed, miou[precision][-1], flush=True)
    diffs = [b - f for b, f in zip(miou["bf16"], miou["fp32"], strict=True)]
    noise = statistics.mean(statistics.stdev(v) for v in miou.values())
    result = {
        "images": args.images,
        "epochs": args.epochs,
        "seeds": seeds,
        "miou": miou,
        "mean_bf16": round(statistics.mean(miou["bf16"]), 4),
        "mean_fp32": round(statistics.mean(miou["fp32"]), 4),
        "mean_difference": round(statistics.mean(diffs), 4),
        "seed_std": round(noise, 4),
        "within_seed_noise": abs(statistics.mean(diffs)) <= noise,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
