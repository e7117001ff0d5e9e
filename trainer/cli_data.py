"""``mars-trainer synth`` and ``stats``: make a dataset, describe a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_common import CliError, _size, add_dataset_args, add_overwrite_arg, load_dataset, say_replaced_store
from .outputs import check_output, write_bytes
from .synth import COMPETITION_IMAGES, COMPETITION_TEST_IMAGES, LABEL_SETS


def _output(text: str, suffix: str) -> Path:
    """The output path, refused unless it ends in ``suffix`` and its folder exists."""
    out = Path(text)
    if out.suffix != suffix:
        raise CliError(f"{out}: the output must end in {suffix}")
    if not out.parent.exists():
        raise CliError(f"{out.parent}: no such folder")
    return out


def truth_path(out: Path) -> Path:
    """``OUT.truth.json``: the label problems planted in a synthetic dataset."""
    return out.with_name(out.stem + ".truth.json")


def cmd_synth(args: argparse.Namespace) -> int:
    from .formats import write_npz
    from .synth import generate

    out = _output(args.out, ".npz")
    if args.test is None:
        args.test = round(args.train * COMPETITION_TEST_IMAGES / COMPETITION_IMAGES)
    if args.train < 1 or args.test < 0:
        raise CliError(f"--train must be at least 1 and --test at least 0, got {args.train} and {args.test}")
    check_output(out, overwrite=args.overwrite)
    check_output(truth_path(out), overwrite=args.overwrite)
    if args.train < 10 and not args.no_problems:
        print("note: fewer than 10 images: no label problems are planted", file=sys.stderr)
    sample = generate(
        args.train, args.test, seed=args.seed, plant_problems=not args.no_problems, shape=args.size,
        labels=args.labels,
    )  # fmt: skip
    ds = sample.dataset
    write_npz(
        out,
        ds.images,
        ds.masks,
        ds.test_images,
        dtype=args.dtype,
        overwrite=args.overwrite,
        classes=ds.classes,
    )
    truth = write_bytes(truth_path(out), json.dumps(sample.truth, indent=1), overwrite=True)
    print(
        f"wrote {out} ({len(ds)} training, {args.test} test images, {args.dtype}) "
        f"and {truth.name} ({len(sample.truth['outlier_group'])} outliers, "
        f"{len(sample.truth['corrupted'])} corrupted masks)"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .cli_common import corrected_stats, open_store
    from .formats import StoredDataset
    from .stats import format_stats

    dataset = load_dataset(args, lazy=True)
    store = None if args.no_corrections else open_store(dataset, None)
    try:
        stats, pool = corrected_stats(dataset, store)
        if store is not None:
            edited, excluded = store.edited(), store.excluded()
            n = dataset.n_labelled if isinstance(dataset, StoredDataset) else len(dataset)
            print(
                f"using corrections from {store.path}: {sum(1 for i in edited if i < n)} corrected, "
                f"{sum(1 for i in edited if i >= n)} labelled since, {len(excluded)} excluded (counted)",
                file=sys.stderr,
            )
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps({**stats.to_json(), "unlabelled_images": pool}))
    else:
        text = format_stats(stats)
        if isinstance(dataset, StoredDataset):
            text = text.replace(
                "no duplicate masks", "duplicate masks: not searched in a dataset read from disk"
            )
        print(text)
        if pool:
            print(f"\n{pool} unlabelled images (not counted above)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import time

    from .convert import convert

    out = _output(args.out, ".zarr")
    show = None
    if sys.stderr.isatty():

        def show(done: int, total: int) -> None:
            print(
                f"\rconverting {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True
            )

    t = time.perf_counter()
    report = convert(
        args.src, out, args.mask_mapping, workers=args.workers, skip_bad=args.skip_bad,
        overwrite=args.overwrite, progress=show,
    )  # fmt: skip
    seconds = time.perf_counter() - t
    n = report.labelled + report.unlabelled
    sizes = f"{report.sizes} frame sizes, padded to " if report.sizes > 1 else ""
    print(
        f"wrote {report.out}: {report.labelled} labelled and {report.unlabelled} unlabelled images "
        f"({sizes}{report.frame[0]}x{report.frame[1]}) in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s)"
    )
    for line in report.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    say_replaced_store(out, report.replaced_store)
    _say_carried(report)
    return 0


def _say_carried(report) -> None:
    carried = report.carried
    if carried is None:
        return
    if carried.store:
        print(
            f"carried the saved corrections ({carried.source_store}) into {carried.store}: "
            f"{carried.masks} saved masks, {carried.excluded} exclusions; the dataset's masks are "
            "the originals (export --out NAME.zarr writes corrected masks in)"
        )
    for line in carried.not_carried:
        print(f"correction not carried: {line}", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic Mars dataset in the competition .npz format")
    p.add_argument("out", help="output .npz; OUT.truth.json records the planted label problems")
    p.add_argument(
        "--train",
        type=int,
        default=COMPETITION_IMAGES,
        help=f"training images (default {COMPETITION_IMAGES})",
    )
    p.add_argument(
        "--test",
        type=int,
        help=f"unlabelled test images (default: as many per training image as the competition's file, "
        f"{COMPETITION_TEST_IMAGES} for {COMPETITION_IMAGES}; 0 for none)",
    )
    p.add_argument("--seed", type=int, default=0, help="the same seed makes the same dataset (default 0)")
    p.add_argument(
        "--dtype",
        choices=["float64", "float32", "uint8"],
        default="float64",
        help="stored dtype; the real file uses float64 (default)",
    )
    p.add_argument("--no-problems", action="store_true", help="plant no outliers or corrupted masks")
    p.add_argument(
        "--size",
        type=_size,
        default=(64, 128),
        metavar="HxW",
        help="frame size (default 64x128, the competition's; 512x512 for frames such as a rover camera's)",
    )
    p.add_argument(
        "--labels",
        choices=LABEL_SETS,
        default="competition",
        help="competition: the five classes (default); soil-rock: only soil and big rocks labelled, as "
        "rover frames labelled rock against soil are; rocks: a class table of its own (ground, rock), "
        "written beside the arrays",
    )
    add_overwrite_arg(p, "replace an existing OUT and its OUT.truth.json")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "convert", help="write a folder or an npz as a chunked zarr dataset that is read lazily"
    )
    p.add_argument("src", help="a folder of images (with masks), an .npz, or 'synthetic[:N[:SEED]]'")
    p.add_argument("--out", required=True, help="the dataset to write, NAME.zarr")
    p.add_argument(
        "--mask-mapping", default="identity", metavar="MAPPING",
        help="how mask values become class ids (as for every command: identity, ai4mars, "
        "'0:1,255:4', '#000000:1,#ff0000:4' or a .toml file)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPUs, at most 8)")
    p.add_argument("--skip-bad", action="store_true", help="leave out frames that cannot be read (listed)")
    add_overwrite_arg(p, "replace an existing OUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("stats", help="class balance and duplicate-mask groups of a dataset")
    add_dataset_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--no-corrections",
        action="store_true",
        help="count the masks as the file has them (by default the dataset's corrections count, as in napari)",
    )
    p.set_defaults(func=cmd_stats)
