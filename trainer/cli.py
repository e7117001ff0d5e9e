"""``mars-trainer``: the command line of the headless engine.

Every command turns bad input into one clear message and a non-zero exit, never a
traceback: errors for people name the file, what was expected and what was found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .dataset import Dataset, DatasetError

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """An error whose message is shown as is."""


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        size = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 64x128, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    from .formats import MASK_MAPPINGS

    p.add_argument(
        "dataset", help="a competition .npz, a folder of image/mask pairs, or 'synthetic[:N[:SEED]]'"
    )
    p.add_argument(
        "--mask-mapping",
        choices=MASK_MAPPINGS,
        default="identity",
        help="folders only: how mask values become class ids (ai4mars: 0..3 -> 1..4, 255 -> 0)",
    )
    p.add_argument("--size", type=_size, help="folders only: resize to HxW (default: the most common size)")


def load_dataset(args: argparse.Namespace) -> Dataset:
    from .formats import open_dataset

    return open_dataset(args.dataset, mask_mapping=args.mask_mapping, size=args.size)


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

    stats = dataset_stats(load_dataset(args))
    if args.json:
        print(json.dumps(stats.to_json()))
    else:
        print(format_stats(stats))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mars-trainer",
        description="Headless Mars terrain segmentation: datasets, statistics and training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands that live in their own modules."""
    from . import cli_review, cli_train

    return [cli_train.register, cli_review.register]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .corrections import CorrectionsError
    from .device import DeviceError
    from .runs import RunDirError

    completed = False
    try:
        code = int(args.func(args) or 0)
        completed = True
        return code
    except (
        DatasetError,
        CliError,
        ConfigError,
        CheckpointError,
        DeviceError,
        RunDirError,
        CorrectionsError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 1
    finally:
        from .device import shutdown_distributed

        shutdown_distributed(wait_for_peers=completed)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
