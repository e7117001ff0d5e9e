"""``mars-trainer suggest`` (which unlabelled images to label next) and ``export-model``
(the model as a TorchScript or ONNX file that runs without this package)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .classes import CLASSES
from .cli_common import CliError, add_dataset_args, load_dataset, positive_int


def _checkpoint_model(path: str):
    from .checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(path), path)
    return model.eval()


def _pool_of(dataset):
    """(unlabelled images, labelled images, the unlabelled images' names, labelled class
    pixel counts) as :func:`~trainer.suggest.score_pool` takes them: arrays of a dataset
    in memory; frames read one at a time from a dataset on disk (any size, any count)."""
    from .formats import StoredDataset
    from .stats import class_pixel_counts
    from .suggest import FramesOf

    if isinstance(dataset, StoredDataset):
        n, total = dataset.n_labelled, len(dataset.names)
        pool, labelled = FramesOf(dataset, range(n, total)), FramesOf(dataset, range(n))
        return pool, labelled, dataset.test_names, dataset.class_pixels.sum(0)
    pool = dataset.test_images if dataset.test_images is not None else dataset.images[:0]
    return pool, dataset.images, dataset.test_names, class_pixel_counts(dataset.masks)


def cmd_suggest(args: argparse.Namespace) -> int:
    from .cli_predict import _progress_printer
    from .device import resolve_device
    from .suggest import describe, rank_pool, score_pool

    dataset = load_dataset(args, lazy=True)
    pool, labelled, names, counts = _pool_of(dataset)
    if not len(pool):
        raise CliError(
            f"{args.dataset}: has no unlabelled images to rank (an npz test_set, or a folder's "
            "images without masks)"
        )
    model = _checkpoint_model(args.checkpoint)
    device = resolve_device(args.device)
    scores = score_pool(
        model, pool, measure=args.measure, device=device, progress=_progress_printer("scoring")
    )
    features = score_pool(model, labelled, device=device).features if len(labelled) else None
    ranking = rank_pool(scores, args.top, features, args.diversity)
    pool_share = scores.class_share.mean(0)
    balance = "  ".join(
        f"{c.name} {100 * pool_share[c.id]:.1f}%"
        + (f" ({100 * counts[c.id] / max(counts[1:].sum(), 1):.1f}%)" if len(labelled) else "")
        for c in CLASSES[1:]
    )
    for entry in ranking:
        entry["name"] = names[entry["index"]]
    text = json.dumps(ranking, indent=1)
    if args.out:
        try:
            Path(args.out).write_text(text + "\n")
        except OSError as exc:
            raise CliError(f"{args.out}: could not be written ({exc.strerror or exc})") from None
        print(f"wrote {args.out}: {len(ranking)} of {len(pool)} unlabelled images, most useful first")
    info = sys.stdout if args.out else sys.stderr
    print(
        f"predicted class balance of the unlabelled images (labelled terrain in brackets): {balance}",
        file=info,
    )
    for k, entry in enumerate(ranking[: args.show]):
        print(
            f"{k + 1:>4}. {entry['name']:>12}  {entry['score']:.4f}  {describe(entry)}",
            file=info,
        )
    if not args.out:
        print(text)
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from .portable import ExportError, export

    model = _checkpoint_model(args.checkpoint)
    out = Path(args.out)
    if not out.parent.exists():
        raise CliError(f"{out.parent}: no such folder")
    try:
        agreement = export(model, args.format, out)
    except ExportError as exc:
        raise CliError(str(exc)) from None
    print(
        f"wrote {out} ({args.format}); checked against the checkpoint on random images of two sizes: "
        f"{100 * agreement:.2f}% of pixels predicted alike"
    )
    return 0


def register(sub) -> None:
    from .portable import FORMATS
    from .suggest import MEASURES

    p = sub.add_parser("suggest", help="rank unlabelled images by how much labelling them should help")
    add_dataset_args(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by mars-trainer train")
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
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser(
        "export-model", help="write the model as TorchScript or ONNX, checked against the checkpoint"
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by mars-trainer train")
    p.add_argument("--format", choices=FORMATS, default="torchscript")
    p.add_argument("--out", required=True, help="the model file (e.g. model.pt or model.onnx)")
    p.set_defaults(func=cmd_export_model)
