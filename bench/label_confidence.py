"""How sure must the model be before its prediction becomes a starting label?

A prediction that becomes a mask keeps only the pixels whose predicted class reaches a
confidence; the rest stay background ("not labelled") for the person to paint. This
trains the default ``cpu`` preset on synthetic Mars (a fixed number of epochs), predicts
unseen images of another seed with flip averaging, as the plugin does, and for each
confidence reports:

* ``kept``: the share of all pixels that get a class;
* ``kept_right``: of those, the share whose class is the true one (pixels whose true
  label is background count as wrong when kept: the model never predicts background,
  so sky and far range come out as terrain);
* ``terrain_covered``: the share of true terrain pixels (classes 1-4) kept and right.

``default`` is the lowest confidence whose kept pixels are at least ``--target`` right
(95% by default): what a person gets to fix should be a few strokes, not a repaint.

    python bench/label_confidence.py [--images 600] [--epochs 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
from _report import report

from trainer import events as ev
from trainer.config import preset
from trainer.engine import fit
from trainer.inference import predict_arrays
from trainer.synth import generate

LEVELS = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    train = generate(args.images, 0, seed=args.seed, plant_problems=False).dataset
    test = generate(args.held_out, 0, seed=args.seed + 1000, plant_problems=False).dataset
    cfg = preset("cpu").replace(epochs=args.epochs, seed=args.seed, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for e in fit(train, cfg, tmp):
            if isinstance(e, ev.Failed):
                raise SystemExit(e.message)
        from trainer.checkpoint import load_checkpoint, model_from_checkpoint

        model, _ = model_from_checkpoint(load_checkpoint(f"{tmp}/checkpoints/last.pt"))
    out = predict_arrays(model, test.images, 32, "cpu", with_probs=True, flip_tta=True)
    conf = out["probs"].astype(np.float32).max(1)
    pred, truth = out["masks"], test.masks
    terrain = truth > 0
    rows = []
    for level in LEVELS:
        kept = conf >= level
        right = kept & (pred == truth)
        rows.append(
            {
                "confidence": level,
                "kept": round(float(kept.mean()), 4),
                "kept_right": round(float(right.sum() / max(kept.sum(), 1)), 4),
                "terrain_covered": round(float((right & terrain).sum() / max(terrain.sum(), 1)), 4),
            }
        )
    default = next((r["confidence"] for r in rows if r["kept_right"] >= args.target), LEVELS[-1])
    result = {
        "preset": "cpu",
        "epochs": args.epochs,
        "train_images": args.images,
        "held_out_images": args.held_out,
        "background_truth_share": round(float((truth == 0).mean()), 4),
        "predicted_background_share": round(float((pred == 0).mean()), 4),
        "target_kept_right": args.target,
        "default": default,
        "levels": rows,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
