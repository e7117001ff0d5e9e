"""How well does the review queue find planted label problems?

On a synthetic dataset with planted problems (an outlier group sharing one mask and
corrupted masks, recorded by the generator), it runs the audit (out-of-fold models on
CPU in a fixed budget) and reports, side by side on the same predictions:

* recall of planted problems in the top K of the queue, K = 1.5 x the number planted;
* whether the whole outlier group is at the very top;
* the same recall for the simple baseline: rank by per-image IoU between prediction and mask.

    python bench/audit_quality.py [--images 300] [--minutes 3] [--seeds 1,2,3] [--json OUT]

Each seed is a different synthetic dataset (different images and planted problems); with
about a dozen corrupted masks per dataset one mask is 0.04 of recall, so several seeds say
more than one.
"""

from __future__ import annotations

import argparse
import json
import time

from _report import report

from trainer.audit import audit, baseline_rank
from trainer.synth import generate


def measure(images: int, seed: int, minutes: float, folds: int) -> dict:
    sample = generate(images, 0, seed=seed)
    outliers, corrupted = sample.truth["outlier_group"], sample.truth["corrupted"]
    planted = set(outliers) | set(corrupted)
    k = int(round(1.5 * len(planted)))
    t0 = time.time()
    ranking, pred, _ = audit(sample.dataset, folds=folds, minutes=minutes, seed=seed)
    seconds = time.time() - t0
    order = [r["index"] for r in ranking]
    base = baseline_rank(sample.dataset.masks, pred)

    def recall(ordering, items) -> float:
        return len(set(ordering[:k]) & set(items)) / max(len(items), 1)

    kinds = sample.truth["corruption_kinds"]
    return {
        "seed": seed,
        "images": images,
        "planted": len(planted),
        "outliers": len(outliers),
        "corrupted": len(corrupted),
        "corruption_kinds": sorted(set(kinds.values())),
        "k": k,
        "recall_at_k": round(recall(order, planted), 3),
        "recall_corrupted_at_k": round(recall(order, corrupted), 3),
        "outlier_group_at_top": set(order[: len(outliers)]) == set(outliers),
        "baseline_recall_at_k": round(recall(base, planted), 3),
        "baseline_recall_corrupted_at_k": round(recall(base, corrupted), 3),
        "baseline_outlier_group_at_top": set(base[: len(outliers)]) == set(outliers),
        "missed": [
            {"index": i, "kind": kinds.get(str(i), "outlier")} for i in sorted(planted - set(order[:k]))
        ],
        "audit_seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument(
        "--minutes", type=float, default=3.0, help="training budget of the audit models, all folds"
    )
    p.add_argument("--folds", type=int, default=3)
    p.add_argument(
        "--seeds", default="1", help="comma-separated dataset seeds; each is a separate dataset and audit"
    )
    p.add_argument("--json")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = []
    for seed in seeds:
        runs.append(measure(args.images, seed, args.minutes, args.folds))
        print(json.dumps(runs[-1]), flush=True)

    def mean(key: str) -> float:
        return round(sum(r[key] for r in runs) / len(runs), 3)

    summary = {
        "seeds": seeds,
        "minutes": args.minutes,
        "folds": args.folds,
        "recall_at_k_mean": mean("recall_at_k"),
        "recall_at_k_min": min(r["recall_at_k"] for r in runs),
        "recall_corrupted_at_k_mean": mean("recall_corrupted_at_k"),
        "baseline_recall_at_k_mean": mean("baseline_recall_at_k"),
        "baseline_recall_corrupted_at_k_mean": mean("baseline_recall_corrupted_at_k"),
        "outlier_group_at_top": all(r["outlier_group_at_top"] for r in runs),
        "ahead_of_baseline": all(r["recall_at_k"] >= r["baseline_recall_at_k"] for r in runs),
    }
    report({"summary": summary, "runs": runs}, args.json, shown=summary)


if __name__ == "__main__":
    main()
