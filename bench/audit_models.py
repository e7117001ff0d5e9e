"""Which recipe makes the best out-of-fold model in the audit's time budget?

On a synthetic dataset, trains one fold's model (two thirds of the images, the planted
outlier group left out as the audit does) with the audit recipe and with the ``cpu``
preset, each for the same wall-clock budget, and reports side by side the pixel accuracy
of their predictions on the held-out third against the *clean* masks (terrain pixels).

Like with like: both arms predict with mirror averaging, hold out the same validation
share and weigh background 1. What still differs is the recipe itself (width, batch,
learning rate) and that the audit recipe validates only at its end, so the time the
``cpu`` preset spends validating every epoch is training time for the audit recipe:
that is part of the recipe, and the JSON says so.

    python bench/audit_models.py [--images 300] [--minutes 1] [--seed 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from _report import report

from trainer import events as ev
from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.config import preset
from trainer.dataset import Dataset
from trainer.engine import fit
from trainer.inference import predict_arrays
from trainer.out_of_fold import audit_config
from trainer.stats import duplicate_mask_groups
from trainer.synth import generate


def held_out_accuracy(sample, train, held, cfg, flip_tta: bool) -> tuple[float, int]:
    ds = sample.dataset
    sub = Dataset(images=ds.images[train], masks=ds.masks[train], source=ds.source)
    steps = 0
    with tempfile.TemporaryDirectory() as tmp:
        for e in fit(sub, cfg, tmp):
            if isinstance(e, ev.Step):
                steps = e.step
        model, _ = model_from_checkpoint(load_checkpoint(tmp + "/checkpoints/last.pt"))
    pred = predict_arrays(model, ds.images[held], 64, "cpu", flip_tta=flip_tta)["masks"]
    clean = sample.clean_masks[held]
    return float((pred == clean)[clean > 0].mean()), steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--minutes", type=float, default=1.0, help="budget of each model")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    sample = generate(args.images, 0, seed=args.seed)
    dupes = {i for g in duplicate_mask_groups(sample.dataset.masks) if len(g) >= 3 for i in g}
    pool = np.array([i for i in range(args.images) if i not in dupes])
    order = np.random.default_rng(args.seed).permutation(pool)
    held = np.sort(np.array_split(order, 3)[0])
    train = np.setdiff1d(order, held)
    audit_cfg = audit_config(args.minutes, args.seed)
    cpu_cfg = preset("cpu").replace(
        epochs=0,
        minutes=args.minutes,
        background_weight=1.0,
        seed=args.seed,
        warmup_steps=20,
        val_fraction=audit_cfg.val_fraction,
    )
    result = {
        "images": args.images,
        "minutes_each": args.minutes,
        "held_out": len(held),
        "same_in_both": "mirror-averaged predictions, validation share, background weight 1",
        "differs": {
            k: [getattr(audit_cfg, k), getattr(cpu_cfg, k)]
            for k in ("base_width", "batch_size", "lr", "val_every", "warmup_steps")
            if getattr(audit_cfg, k) != getattr(cpu_cfg, k)
        },
    }
    for name, cfg in (("audit_recipe", audit_cfg), ("cpu_preset", cpu_cfg)):
        acc, steps = held_out_accuracy(sample, train, held, cfg, flip_tta=True)
        result[name] = {"pixel_accuracy_vs_clean": round(acc, 3), "steps": steps}
        print(name, result[name], flush=True)
    result["ratio"] = round(
        result["audit_recipe"]["pixel_accuracy_vs_clean"] / result["cpu_preset"]["pixel_accuracy_vs_clean"], 3
    )
    report(result, args.json)


if __name__ == "__main__":
    main()
