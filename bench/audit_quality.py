"""How well does the review queue find planted label problems?

On a synthetic dataset with planted problems (an outlier group sharing one mask and
corrupted masks, recorded by the generator), it runs the audit (out-of-fold models on
CPU in a fixed budget) and reports, side by side on the same predictions:

* recall of planted problems in the top K of the queue, K = 1.5 x the number planted;
* whether the whole outlier group is at the very top;
* the same recall for the simple baseline: rank by per-image IoU between prediction and mask.

    python bench/audit_quality.py [--images 300] [--minutes 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

from trainer.audit import audit, baseline_rank
from trainer.synth import generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300)
    p.add_argument(
        "--minutes", type=float, default=3.0, help="training budget of the audit models, all folds"
    )
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    sample = generate(args.images, 0, seed=args.seed)
    outliers, corrupted = sample.truth["outlier_group"], sample.truth["corrupted"]
    planted = set(outliers) | set(corrupted)
    k = int(round(1.5 * len(planted)))
    t0 = time.time()
    ranking, pred, _ = audit(sample.dataset, folds=args.folds, minutes=args.minutes, seed=args.seed)
    seconds = time.time() - t0
    order = [r["index"] for r in ranking]
    base = baseline_rank(sample.dataset.masks, pred)

    def recall(ordering, items) -> float:
        return len(set(ordering[:k]) & set(items)) / max(len(items), 1)

    kinds = sample.truth["corruption_kinds"]
    result = {
        "images": args.images,
        "planted": len(planted),
        "outliers": len(outliers),
        "corrupted": len(corrupted),
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
        "minutes": args.minutes,
        "folds": args.folds,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
