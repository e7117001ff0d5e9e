"""``mars-trainer synth`` and ``stats``: make a dataset, describe a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_common import CliError, add_dataset_args, load_dataset


def cmd_synth(args: argparse.Namespace) -> int:
    from .formats import write_npz
    from .synth import generate

    out = Path(args.out)
    if out.suffix != ".npz":
        raise CliError(f"{out}: the output must end in .npz")
    if not out.parent.exists():
        raise CliError(f"{out.parent}: no such folder")
    if args.train < 10 and not args.no_problems:
        print("note: fewer than 10 images: no label problems are planted", file=sys.stderr)
    sample = generate(args.train, args.test, seed=args.seed, plant_problems=not args.no_problems)
    ds = sample.dataset
    try:
        write_npz(out, ds.images, ds.masks, ds.test_images, dtype=args.dtype)
        truth_path = out.with_name(out.stem + ".truth.json")
        truth_path.write_text(json.dumps(sample.truth, indent=1))
    except OSError as exc:
        raise CliError(f"{out}: could not be written ({exc.strerror or exc})") from None
    print(
        f"wrote {out} ({len(ds)} training, {args.test} test images, {args.dtype}) "
        f"and {truth_path.name} ({len(sample.truth['outlier_group'])} outliers, "
        f"{len(sample.truth['corrupted'])} corrupted masks)"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import dataset_stats, format_stats

    dataset = load_dataset(args)
    stats = dataset_stats(dataset)
    pool = 0 if dataset.test_images is None else len(dataset.test_images)
    if args.json:
        print(json.dumps({**stats.to_json(), "unlabelled_images": pool}))
    else:
        print(format_stats(stats))
        if pool:
            print(f"\n{pool} unlabelled images (not counted above)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic Mars dataset in the competition .npz format")
    p.add_argument("out", help="output .npz; OUT.truth.json records the planted label problems")
    p.add_argument("--train", type=int, default=2615, help="training images (default 2615)")
    p.add_argument("--test", type=int, default=0, help="unlabelled test images (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float64", "float32", "uint8"],
        default="float64",
        help="stored dtype; the real file uses float64 (default)",
    )
    p.add_argument("--no-problems", action="store_true", help="plant no outliers or corrupted masks")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="class balance and duplicate-mask groups of a dataset")
    add_dataset_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_stats)
