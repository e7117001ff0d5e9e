"""What every ``mars-trainer`` command shares: the error for people, the dataset
arguments, opening a dataset and its corrections store, a checkpoint to predict with.
Command modules import from here and from nothing else of the CLI, so the CLI has no
import cycle."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .classes import CLASSES
from .dataset import Dataset

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


def add_dataset_args(p: argparse.ArgumentParser, inputs: bool = False) -> None:
    """The DATASET argument and its reading options; ``inputs``: one or more inputs instead."""
    what = "a competition .npz, a folder of image/mask pairs, a .zarr dataset, or 'synthetic[:N[:SEED]]'"
    if inputs:
        p.add_argument(
            "inputs", nargs="+", metavar="INPUT", help=f"{what}; or image files and folders of images"
        )
    else:
        p.add_argument("dataset", help=what)
    p.add_argument(
        "--mask-mapping",
        default="identity",
        metavar="MAPPING",
        help="folders only: how mask values become class ids: identity (0..4), ai4mars "
        "(0..3 -> 1..4, 255 -> 0), value pairs '0:1,255:4', colour pairs '#000000:1,#ff0000:4', "
        "or a .toml file of such pairs (default: identity)",
    )
    p.add_argument("--size", type=_size, help="folders only: resize to HxW (default: the most common size)")


def load_dataset(args: argparse.Namespace, lazy: bool = False) -> Dataset:
    """The command's dataset; ``lazy``: a large zarr dataset may come back unread
    (a :class:`~trainer.formats.StoredDataset`) for commands that read it from disk."""
    from .formats import is_zarr, open_dataset

    folder = Path(args.dataset).is_dir() and not is_zarr(args.dataset)
    for flag, given in (
        ("--mask-mapping", args.mask_mapping != "identity"),
        ("--size", args.size is not None),
    ):
        if given and not folder:
            raise CliError(
                f"{args.dataset}: {flag} applies to folders of image files only; an npz or a converted "
                "dataset holds class ids at their size already (convert --mask-mapping sets it for a folder)"
            )
    return open_dataset(args.dataset, mask_mapping=args.mask_mapping, size=args.size, lazy=lazy)


def open_store(dataset, path: str | None = None):
    """The dataset's corrections store, or None when it has none yet."""
    from .corrections import CorrectionStore

    if path is not None and not Path(path).is_file():
        # named on purpose: going on without it would write the uncorrected masks silently
        raise CliError(f"{path}: no such corrections database (--corrections)")
    return CorrectionStore.existing(dataset, path)


def corrected_stats(dataset, store):
    """(stats, unlabelled images) with the store's corrections in (None: as the file has
    them), as napari counts: corrected masks, unlabelled images labelled since counted as
    labelled, excluded images still counted (they are in the dataset)."""
    import numpy as np

    from .formats import StoredDataset
    from .stats import counts_stats, dataset_stats

    if not isinstance(dataset, StoredDataset):
        pool = 0 if dataset.test_images is None else len(dataset.test_images)
        if store is None:
            return dataset_stats(dataset), pool
        applied, _ = store.apply(dataset)
        return dataset_stats(applied), pool - (len(applied) - len(dataset))
    n = dataset.n_labelled  # from its class table; duplicates not searched
    k = dataset.num_classes
    pixels = [dataset.class_pixels[i] for i in range(n)]
    edited = store.snapshot()[0] if store is not None else {}
    for i, mask in sorted(edited.items()):
        counts = np.bincount(mask.ravel(), minlength=k)[:k]
        if i < n:
            pixels[i] = counts
        else:
            pixels.append(counts)
    pixels = np.array(pixels, np.int64).reshape(-1, k)
    stats = counts_stats((pixels > 0).sum(axis=0), pixels.sum(axis=0), len(pixels), classes=dataset.classes)
    return stats, dataset.n_unlabelled - (len(pixels) - n)


def say_replaced_store(out, moved_to: str | None) -> None:
    """Tell the user where the corrections of a dataset an output replaced went."""
    if moved_to:
        print(
            f"{Path(out).name} replaced an earlier dataset: its corrections were moved to {moved_to}",
            file=sys.stderr,
        )


def load_model(args, dataset=None):
    """(checkpoint dict, model ready to predict, device, distributed context, precision).
    With ``dataset`` (what the model is to be applied to), a checkpoint of another class
    table is refused, naming both."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .device import init_distributed, resolve_device, resolve_precision
    from .inference import prepare_model

    data = load_checkpoint(args.checkpoint)
    classes = getattr(dataset, "classes", None)
    model, cfg = model_from_checkpoint(
        data, args.checkpoint, classes, f"{getattr(dataset, 'source', '')}" or "the dataset"
    )
    dist = init_distributed(args.device)
    device = resolve_device(args.device, dist.local_rank)
    precision = resolve_precision(args.precision, device)
    return data, prepare_model(model, device), device, dist, precision


def split_indices(data: dict, split: str, n: int, source: str):
    """The checkpoint's ``split`` rows (``all``: every labelled row) of a dataset of ``n``."""
    import numpy as np

    if split == "all":
        return np.arange(n)
    key = "val_indices" if split == "val" else "train_indices"
    idx = np.asarray(data.get(key, []), dtype=np.int64)
    if len(idx) == 0 or idx.max() >= n:
        raise CliError(
            f"{source}: the checkpoint's {split} split does not fit this dataset of {n} images; use --split all"
        )
    return idx


def progress_printer(label: str):
    """A ``(done, total)`` callback that shows progress on a terminal's stderr, else nothing."""
    stream = sys.stderr

    def show(done: int, total: int) -> None:
        if stream is not None and stream.isatty():
            stream.write(f"\r{label}: {done}/{total}")
            if done == total:
                stream.write("\n")
            stream.flush()

    return show


def checkpoint_arg(which: str = "best"):
    """An argparse type: a checkpoint file, or a run directory standing for its ``which``
    checkpoint (``best`` or ``last``)."""
    from .runs import checkpoint_file

    def parse(text: str) -> str:
        try:
            return str(checkpoint_file(text, which))
        except FileNotFoundError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_checkpoint_arg(p: argparse.ArgumentParser, required: bool = True, help: str = "") -> None:
    p.add_argument(
        "--checkpoint",
        required=required,
        type=checkpoint_arg("best"),
        help=help or "a checkpoint written by mars-trainer train, or its run directory (then its best.pt)",
    )


def inference_parser(sub, name: str, help: str, splits: tuple, default: str, inputs: bool = False):
    """A command that uses a checkpoint: its dataset, checkpoint, device, precision, batch
    and (given ``splits``) split arguments."""
    from .config import GPU_PREDICT_BATCH, PREDICT_BATCH

    q = sub.add_parser(name, help=help)
    add_dataset_args(q, inputs=inputs)
    add_checkpoint_arg(q)
    q.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to predict (default: auto, a GPU when there is one)",
    )
    q.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 on GPUs and on CPUs that compute bf16 natively, else fp32",
    )
    q.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"images per forward pass; default {PREDICT_BATCH} of 64x128 on a CPU, "
        f"{GPU_PREDICT_BATCH} on a GPU, as many pixels for other sizes (on a CPU one at a time "
        "from 512x512 up)",
    )
    if splits:
        q.add_argument("--split", choices=splits, default=default, help=f"which images (default {default})")
    return q


def add_overwrite_arg(p: argparse.ArgumentParser, help: str = "replace an existing --out") -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"{help} (an output that is or holds one of the command's inputs is refused all the same)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def iou_table(iou: list, miou: float, classes=CLASSES, absent=()) -> str:
    """Per-class IoU under the class names; a class in ``absent`` (not in the training
    labels, so never predicted) reads "absent" rather than a number."""

    def fmt(v):
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"

    width = max(9, *(len(c.name) for c in classes))
    names = " ".join(f"{c.name:>{width}}" for c in classes)
    values = " ".join(f"{'absent' if c in absent else fmt(v):>{width}}" for c, v in enumerate(iou))
    label = classes.miou_label() if hasattr(classes, "miou_label") else "mIoU(1-4)"
    return f"  IoU {names}   {label}\n      {values}   {fmt(miou)}"
