"""Does the label-next queue save labels? The loop simulated on synthetic Mars with its
masks hidden until an image is picked.

The pool is like rover data, not like the starting labels: five sites that differ in
terrain mix, rock density, lighting and grain (``SITES``); the first labels come from two
of them. Each round adds ``--per-round`` labels chosen by the queue (``trainer.suggest``,
the model of the round before ranking what is left of the pool, diversity counted against
everything labelled) or at random, and trains a new model from scratch with the same
number of steps whatever the label count; mIoU (classes 1-4) is scored on a fixed
held-out set drawn equally from every site. Both strategies share the first round.

``labels_saved``: 1 - (labels the queue needed to reach random selection's final mIoU,
interpolated between rounds) / (random's final label count), on the curves averaged over
seeds; 0 when the queue never reaches it, null when random selection did not improve on
the first round. Per seed too.

    python bench/active_learning.py [--seeds 0,1,2] [--rounds 5] [--steps 250] [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import tempfile

import numpy as np
from _report import report

from trainer import events as ev
from trainer.checkpoint import load_checkpoint, model_from_checkpoint
from trainer.config import preset
from trainer.dataset import Dataset
from trainer.engine import fit
from trainer.inference import predict_arrays
from trainer.metrics import confusion_matrix, metrics_from_confusion
from trainer.suggest import rank_pool, score_pool
from trainer.synth import Site, generate

SITES = [
    Site(),  # the sample's plains
    Site(terrain_mix=(1.2, 4.0, 0.8), rock_rate=0.25, brightness=-0.12, texture_scale=0.8),  # rocky, darker
    Site(
        terrain_mix=(0.8, 0.6, 4.0), rock_rate=0.01, brightness=0.12, contrast=0.7, texture_scale=1.4
    ),  # dunes
    Site(terrain_mix=(3.0, 1.0, 1.0), rock_rate=0.4, contrast=1.35, texture_scale=1.2),  # boulders, harsh sun
    Site(
        terrain_mix=(1.5, 1.5, 1.5), rock_rate=0.08, brightness=-0.2, contrast=0.8, texture_scale=0.7
    ),  # dusk
]
START_SITES = (0, 1)


def make_data(seed: int, start: int, pool_per_site: int, test_per_site: int):
    """(start images, masks), (pool images, masks, sites), (test images, masks)."""
    parts = []
    for k, site in enumerate(SITES):
        n = pool_per_site + test_per_site + (start if k in START_SITES else 0)
        ds = generate(n, 0, seed=seed * 100 + k, plant_problems=False, site=site).dataset
        parts.append((ds.images, ds.masks))
    first = [(im[:start], m[:start]) for k, (im, m) in enumerate(parts) if k in START_SITES]
    rng = np.random.default_rng(seed)
    s_img, s_mask = np.concatenate([f[0] for f in first]), np.concatenate([f[1] for f in first])
    pick = rng.permutation(len(s_img))[:start]
    off = [start if k in START_SITES else 0 for k in range(len(SITES))]
    pool = [
        (im[o : o + pool_per_site], m[o : o + pool_per_site]) for (im, m), o in zip(parts, off, strict=True)
    ]
    test = [(im[o + pool_per_site :], m[o + pool_per_site :]) for (im, m), o in zip(parts, off, strict=True)]
    sites = np.repeat(np.arange(len(SITES)), pool_per_site)
    return (
        (s_img[pick], s_mask[pick]),
        (np.concatenate([p[0] for p in pool]), np.concatenate([p[1] for p in pool]), sites),
        (np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])),
    )


def train(images, masks, steps: int, seed: int):
    cfg = preset("cpu").replace(device="cpu", seed=seed, val_fraction=0.05, checkpoint_every=10**6)
    cfg = cfg.replace(epochs=max(1, round(steps / math.ceil(len(images) * 0.95 / cfg.batch_size))))
    with tempfile.TemporaryDirectory() as tmp:
        for e in fit(Dataset(images=images, masks=masks, source="al"), cfg, tmp):
            if isinstance(e, ev.Failed):
                raise SystemExit(e.message)
        model, _ = model_from_checkpoint(load_checkpoint(f"{tmp}/checkpoints/last.pt"))
    return model.eval()


def miou(model, images, masks) -> float:
    pred = predict_arrays(model, images, 64, "cpu")["masks"]
    return float(metrics_from_confusion(confusion_matrix(pred, masks).tolist())["miou"])


def run_seed(seed: int, args) -> dict:
    (s_img, s_mask), (p_img, p_mask, sites), (t_img, t_mask) = make_data(
        seed, args.start, args.pool // len(SITES), args.test // len(SITES)
    )
    first = train(s_img, s_mask, args.steps, seed)
    curves = {}
    picks_by_site = {}
    for strategy in ("queue", "random"):
        rng = np.random.default_rng(seed + 7)
        taken = np.zeros(len(p_img), bool)
        model, scores = first, [miou(first, t_img, t_mask)]
        for _ in range(args.rounds):
            left = np.flatnonzero(~taken)
            if strategy == "random":
                new = rng.choice(left, args.per_round, replace=False)
            else:
                lab_img = np.concatenate([s_img, p_img[taken]])
                pool_scores = score_pool(model, p_img[left])
                labelled = score_pool(model, lab_img).features
                ranking = rank_pool(pool_scores, args.per_round, labelled, args.diversity)
                new = left[[e["index"] for e in ranking]]
            taken[new] = True
            model = train(
                np.concatenate([s_img, p_img[taken]]),
                np.concatenate([s_mask, p_mask[taken]]),
                args.steps,
                seed,
            )
            scores.append(miou(model, t_img, t_mask))
        curves[strategy] = scores
        picks_by_site[strategy] = np.bincount(sites[taken], minlength=len(SITES)).tolist()
    return {"seed": seed, **{f"{k}_miou": v for k, v in curves.items()}, "picks_by_site": picks_by_site}


def labels_saved(labels: list[int], queue: list[float], random: list[float]) -> float | None:
    """None when random selection did not improve on the shared first round."""
    target = random[-1]
    if target <= random[0]:
        return None
    for k in range(len(labels)):
        if queue[k] >= target:
            if k == 0:
                need = labels[0]
            else:
                frac = (target - queue[k - 1]) / max(queue[k] - queue[k - 1], 1e-9)
                need = labels[k - 1] + frac * (labels[k] - labels[k - 1])
            return round(1 - need / labels[-1], 3)
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--start", type=int, default=40)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--per-round", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--steps", type=int, default=250, help="training steps per round, whatever the label count"
    )
    p.add_argument("--diversity", type=float, default=1.0)
    p.add_argument("--json")
    args = p.parse_args()
    runs = [run_seed(int(s), args) for s in args.seeds.split(",")]
    labels = [args.start + k * args.per_round for k in range(args.rounds + 1)]
    queue = np.mean([r["queue_miou"] for r in runs], 0).round(4).tolist()
    rand = np.mean([r["random_miou"] for r in runs], 0).round(4).tolist()
    result = {
        "labels": labels,
        "queue_miou": queue,
        "random_miou": rand,
        "labels_saved": labels_saved(labels, queue, rand),
        "labels_saved_per_seed": [labels_saved(labels, r["queue_miou"], r["random_miou"]) for r in runs],
        "seed_spread_final": round(float(np.std([r["random_miou"][-1] for r in runs])), 4),
        "start_sites": list(START_SITES),
        "sites": len(SITES),
        "steps_per_round": args.steps,
        "diversity": args.diversity,
        "runs": runs,
    }
    report(result, args.json)


if __name__ == "__main__":
    main()
