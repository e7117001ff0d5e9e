"""``mars-trainer suggest`` (which unlabelled images to label next) and ``export-model``
(the model as a TorchScript or ONNX file that runs without this package)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classes import CLASSES
from .cli_common import (
    CliError,
    add_checkpoint_arg,
    add_dataset_args,
    add_overwrite_arg,
    corrected_stats,
    load_dataset,
    positive_int,
    progress_printer,
)
from .outputs import check_output, dataset_inputs, partial_name, write_bytes, written


def _checkpoint_model(path: str, dataset=None):
    """The checkpoint's model in eval mode; with ``dataset``, one of another class table
    is refused, naming both."""
    from .checkpoint import load_checkpoint, model_from_checkpoint

    classes = getattr(dataset, "classes", None)
    model, _ = model_from_checkpoint(
        load_checkpoint(path), path, classes, getattr(dataset, "source", "the dataset")
    )
    return model.eval()


@dataclass
class _Pool:
    """What suggest ranks and against what: the unlabelled images not labelled since nor
    excluded (``js``: their unlabelled indices), and the labelled images (those labelled
    since included, the excluded left out)."""

    images: object  # an (M, H, W) array, or FramesOf a dataset read from disk
    js: list[int]
    labelled: object
    unlabelled: int  # in the dataset
    since: int  # unlabelled images labelled since, ranked no more
    counts: np.ndarray  # labelled class pixels, the corrections counted (as stats counts them)


def _pool_of(dataset, store) -> _Pool:
    """Arrays of a dataset in memory; frames read one at a time from a dataset on disk
    (any size, any count). ``store``: its corrections, or None."""
    from .formats import StoredDataset
    from .suggest import FramesOf

    stored = isinstance(dataset, StoredDataset)
    n = dataset.n_labelled if stored else len(dataset)
    m = len(dataset.test_names)
    edited, excluded = (store.edited(), store.excluded()) if store is not None else (set(), set())
    since = [j for j in range(m) if n + j in edited and n + j not in excluded]
    js = [j for j in range(m) if n + j not in edited and n + j not in excluded]
    kept = [i for i in range(n) if i not in excluded]
    if stored:
        pool, labelled = (
            FramesOf(dataset, [n + j for j in js]),
            FramesOf(dataset, kept + [n + j for j in since]),
        )
    else:
        pool = dataset.test_images[js] if m else dataset.images[:0]
        labelled = dataset.images if len(kept) == n else dataset.images[kept]  # no copy when all are kept
        if since:
            labelled = np.concatenate([labelled, dataset.test_images[since]])
    stats, _ = corrected_stats(dataset, store)  # the labelled terrain as stats and napari count it
    counts = np.array([c.pixels for c in stats.classes], np.int64)
    return _Pool(pool, js, labelled, m, len(since), counts)


def _inputs(args: argparse.Namespace) -> list:
    return [*dataset_inputs(args.dataset), args.checkpoint]


def cmd_suggest(args: argparse.Namespace) -> int:
    from .cli_common import open_store
    from .device import resolve_device
    from .suggest import rank_pool, score_pool

    if args.out:
        check_output(args.out, _inputs(args), args.overwrite)
    if not 0.0 <= args.diversity <= 1.0:  # nan fails both
        raise CliError(f"--diversity must be between 0 and 1, got {args.diversity}")
    dataset = load_dataset(args, lazy=True)
    store = None if args.no_corrections else open_store(dataset, None)
    try:
        pool = _pool_of(dataset, store)
    finally:
        if store is not None:
            store.close()
    if pool.since:
        print(f"{pool.since} unlabelled images labelled since ({store.path}) are not ranked", file=sys.stderr)
    if not pool.unlabelled:
        raise CliError(
            f"{args.dataset}: has no unlabelled images to rank (an npz test_set, or a folder's "
            "images without masks)"
        )
    if not len(pool.js):
        raise CliError(
            f"{args.dataset}: every unlabelled image has been labelled since or excluded; nothing to rank "
            "(--no-corrections ranks them all)"
        )
    model = _checkpoint_model(args.checkpoint, dataset)
    device = resolve_device(args.device)
    scores = score_pool(
        model, pool.images, measure=args.measure, device=device, progress=progress_printer("scoring")
    )
    features = score_pool(model, pool.labelled, device=device).features if len(pool.labelled) else None
    ranking = rank_pool(scores, args.top, features, args.diversity, dataset.classes)
    for entry in ranking:
        entry["index"] = pool.js[entry["index"]]
        entry["name"] = dataset.test_names[entry["index"]]
    _say_ranking(args, ranking, scores.class_share.mean(0), pool, dataset.classes)
    return 0


def _say_ranking(
    args: argparse.Namespace, ranking: list[dict], pool_share: np.ndarray, pool: _Pool, classes=CLASSES
) -> None:
    """The ranking as JSON (to ``--out``, else stdout), the predicted class balance of the
    pool against the labelled one, and the first ``--show`` entries with their reasons."""
    from .suggest import describe

    counts = pool.counts
    balance = "  ".join(
        f"{c.name} {100 * pool_share[c.id]:.1f}%"
        + (f" ({100 * counts[c.id] / max(counts[1:].sum(), 1):.1f}%)" if len(pool.labelled) else "")
        for c in classes[1:]
    )
    text = json.dumps(ranking, indent=1)
    if args.out:
        write_bytes(args.out, text + "\n", inputs=_inputs(args), overwrite=args.overwrite)
        print(f"wrote {args.out}: {len(ranking)} of {len(pool.js)} unlabelled images, most useful first")
    info = sys.stdout if args.out else sys.stderr
    print(
        f"predicted class balance of the unlabelled images (labelled terrain in brackets): {balance}",
        file=info,
    )
    for k, entry in enumerate(ranking[: args.show]):
        print(f"{k + 1:>4}. {entry['name']:>12}  {entry['score']:.4f}  {describe(entry)}", file=info)
    if not args.out:
        print(text)


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")
SHOWN = {"onnx": "an ONNX", "torchscript": "a TorchScript"}


def _export_format(out: Path, fmt: str | None) -> str:
    """The format ``--format`` names, else the one the file name says (``.onnx``: ONNX,
    else TorchScript). A name that says the other format is refused: a TorchScript file
    named ``.onnx`` fails in every ONNX runtime with a message about protobufs."""
    suffix = out.suffix.lower()
    said = "onnx" if suffix == ".onnx" else "torchscript" if suffix in TORCHSCRIPT_SUFFIXES else None
    if fmt is None:
        return said or "torchscript"
    if said is not None and said != fmt:
        raise CliError(
            f"{out}: the name of {SHOWN[said]} file for {SHOWN[fmt]} model; name it "
            f"{out.with_suffix('.onnx' if fmt == 'onnx' else '.pt').name}, or leave --format out"
        )
    return fmt


def cmd_export_model(args: argparse.Namespace) -> int:
    from .portable import ExportError, export

    out = Path(args.out)
    fmt = _export_format(out, args.format)
    check_output(out, [args.checkpoint], args.overwrite)
    model = _checkpoint_model(args.checkpoint)
    try:
        with written(out, [args.checkpoint], args.overwrite) as tmp:
            agreement = export(model, fmt, tmp)
    except ExportError as exc:
        raise CliError(str(exc).replace(str(partial_name(out)), str(out))) from None
    print(
        f"wrote {out} ({fmt}); checked against the checkpoint on random images of two sizes: "
        f"{100 * agreement:.2f}% of pixels predicted alike"
    )
    return 0


def register(sub) -> None:
    from .portable import FORMATS
    from .suggest import MEASURES

    p = sub.add_parser("suggest", help="rank unlabelled images by how much labelling them should help")
    add_dataset_args(p)
    add_checkpoint_arg(p)
    p.add_argument("--top", type=positive_int, help="keep the first K (default: every unlabelled image)")
    p.add_argument("--out", help='a JSON file: [{"index", "name", "score", "reasons"}] (default: print it)')
    p.add_argument(
        "--measure",
        choices=MEASURES,
        default="margin",
        help="per-pixel doubt: 1 - margin of the two likeliest classes, or normalised entropy",
    )
    p.add_argument(
        "--diversity",
        type=float,
        default=1.0,
        help="0: uncertainty alone; 1 (default): discount images like those already picked or labelled",
    )
    p.add_argument("--show", type=int, default=10, help="print this many entries with their reasons")
    add_overwrite_arg(p)
    p.add_argument(
        "--no-corrections",
        action="store_true",
        help="rank every unlabelled image, those labelled since or excluded too (by default they are left out)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to score (default: auto, a GPU when there is one)",
    )
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser(
        "export-model", help="write the model as TorchScript or ONNX, checked against the checkpoint"
    )
    add_checkpoint_arg(p)
    p.add_argument("--format", choices=FORMATS, help="default: onnx for a file named .onnx, else torchscript")
    p.add_argument("--out", required=True, help="the model file (e.g. model.pt or model.onnx)")
    add_overwrite_arg(p)
    p.set_defaults(func=cmd_export_model)
