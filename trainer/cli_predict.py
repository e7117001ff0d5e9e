"""``mars-trainer evaluate``, ``predict`` and ``submit``: use a trained checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .cli_common import CliError, add_dataset_args, iou_table, load_dataset, positive_int
from .config import PREDICT_BATCH


def _load_model(args):
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .device import init_distributed, resolve_device, resolve_precision
    from .inference import prepare_model

    data = load_checkpoint(args.checkpoint)
    model, cfg = model_from_checkpoint(data, args.checkpoint)
    dist = init_distributed(args.device)
    device = resolve_device(args.device, dist.local_rank)
    precision = resolve_precision(args.precision, device)
    return data, prepare_model(model, device), device, dist, precision


def _split_indices(data: dict, split: str, n: int, source: str) -> np.ndarray:
    if split == "all":
        return np.arange(n)
    key = "val_indices" if split == "val" else "train_indices"
    idx = np.asarray(data.get(key, []), dtype=np.int64)
    if len(idx) == 0 or idx.max() >= n:
        raise CliError(
            f"{source}: the checkpoint's {split} split does not fit this dataset of {n} images; use --split all"
        )
    return idx


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def _evaluated(args, dataset, data, say: bool = True) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The rows to score (labelled rows, then the unlabelled images labelled since as rows
    ``n + j``) and the corrected masks by row: with the dataset's corrections, as training
    validated, the excluded images left out and corrected masks as the truth; the split's
    own rows and masks with ``--no-corrections``."""
    from .cli_common import open_store
    from .formats import StoredDataset

    n = dataset.n_labelled if isinstance(dataset, StoredDataset) else len(dataset)
    idx = _split_indices(data, args.split, n, args.checkpoint)
    store = None if args.no_corrections else open_store(dataset, None)
    if store is None:
        return idx, {}
    try:
        edited, excluded = store.snapshot()
    finally:
        store.close()
    new = np.array(sorted(i for i in edited if i >= n) if args.split != "val" else [], np.int64)
    # As training takes them in (epoch_corrections): sorted, the excluded left out.
    kept = np.setdiff1d(np.union1d(idx, new), np.fromiter(excluded, np.int64, len(excluded)))
    if say:
        print(
            f"using corrections from {store.path}: {sum(1 for i in edited if i < n)} corrected, "
            f"{len(new)} labelled since, {len(idx) + len(new) - len(kept)} excluded of this split "
            "(--no-corrections: the masks as they are)",
            file=sys.stderr,
        )
    return kept, edited


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .formats import StoredDataset
    from .inference import confusion_on, predict_batch
    from .metrics import nan_to_none
    from .tiling import frames_confusion

    dataset = load_dataset(args, lazy=True)
    data, model, device, dist, precision = _load_model(args)
    idx, edited = _evaluated(args, dataset, data, say=dist.is_main)  # said once under torchrun
    if not len(idx):
        raise CliError(
            f"{args.dataset}: every image of the {args.split} split is excluded; nothing to evaluate"
        )
    if isinstance(dataset, StoredDataset):  # frame by frame from disk, large frames by tiles
        show = _progress_printer("evaluating") if dist.is_main else lambda done, total: None
        frames = frames_confusion(model, dataset, idx, device, precision, dist, overrides=edited)
        while True:
            try:
                done, _ = next(frames)
            except StopIteration as end:
                result = end.value.compute()
                break
            show(min(len(idx), done * dist.world), len(idx))
    else:
        n = len(dataset)
        pool = dataset.test_images
        images = np.stack([dataset.images[i] if i < n else pool[i - n] for i in idx])
        masks = np.stack([edited[i] if i in edited else dataset.masks[i] for i in idx])
        batch = args.batch_size or predict_batch(images.shape)
        images, masks = torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device)
        result = confusion_on(model, images, masks, np.arange(len(idx)), batch, dist, precision).compute()
    result["images"] = len(idx)
    if not dist.is_main:
        return 0
    if args.json:
        print(json.dumps(nan_to_none(result)))
    else:
        print(f"{args.split} split: {len(idx)} images")
        print(iou_table(result["iou"], result["miou"]))
        print(f"  mIoU as Keras MeanIoU(ignore_class=0) prints it: {result['miou_keras']:.4f}")
        print(f"  pixel accuracy (background ignored): {result['pixel_accuracy']:.4f}")
    return 0


def _predict_images(args, dataset, data):
    if args.split == "test":
        if dataset.test_images is None:
            raise CliError(f"{args.dataset}: has no test_set to predict; use --split val, train or all")
        return dataset.test_images
    return dataset.images[_split_indices(data, args.split, len(dataset), args.checkpoint)]


def _progress_printer(label: str):
    stream = sys.stderr

    def show(done: int, total: int) -> None:
        if stream is not None and stream.isatty():
            stream.write(f"\r{label}: {done}/{total}")
            if done == total:
                stream.write("\n")
            stream.flush()

    return show


def cmd_predict(args: argparse.Namespace) -> int:
    if str(args.out).endswith(".npz"):
        return _predict_dataset(args)
    return _predict_files(args)


def _predict_dataset(args: argparse.Namespace) -> int:
    from .inference import keep_confident, predict_arrays

    if len(args.inputs) != 1:
        raise CliError("an .npz output takes one dataset; to predict image files give an output folder")
    args.dataset = args.inputs[0]
    out = Path(args.out)
    dataset = load_dataset(args)
    data, model, device, _, precision = _load_model(args)
    images = _predict_images(args, dataset, data)
    result = predict_arrays(
        model,
        images,
        args.batch_size,
        device,
        with_probs=args.probs or args.min_confidence > 0,
        progress=_progress_printer("predicting"),
        precision=precision,
    )
    if args.min_confidence > 0:
        result["masks"] = keep_confident(result["masks"], result["probs"].max(axis=1), args.min_confidence)
    if not args.probs:
        result.pop("probs", None)
    try:
        np.savez_compressed(out, **result)
    except OSError as exc:
        raise CliError(f"{out}: could not be written ({exc.strerror or exc})") from None
    print(f"wrote {out}: masks {result['masks'].shape}" + (" and probs" if args.probs else ""))
    return 0


def _frames(args):
    """(name to write, image loader) for each input: image files and folders of them, or
    the frames of one zarr dataset (``--split test``: its unlabelled frames; else all)."""
    from .dataset import DatasetError
    from .formats import is_zarr, open_zarr
    from .images import image_files, read_image

    if len(args.inputs) == 1 and is_zarr(args.inputs[0]):
        stored = open_zarr(args.inputs[0])
        rows = (
            range(stored.n_labelled, len(stored.names)) if args.split == "test" else range(len(stored.names))
        )
        if not len(rows):
            raise CliError(f"{args.inputs[0]}: has no unlabelled frames to predict; use --split all")
        return [(Path(stored.names[i]), lambda i=i: stored.image(i)) for i in rows]
    try:
        files = image_files(args.inputs)
    except DatasetError as exc:
        raise CliError(str(exc)) from None
    return [(rel, lambda path=path: read_image(path)) for path, rel in files]


def _predict_files(args: argparse.Namespace) -> int:
    """One PNG mask (values 0-4, the input's size) per input image, images larger than a
    megapixel by overlapping tiles; unreadable files are listed at the end and make the
    exit code 2, after every readable one is written."""
    from PIL import Image

    from .dataset import DatasetError
    from .inference import keep_confident
    from .tiling import predict_any

    frames = _frames(args)
    _, model, device, _, precision = _load_model(args)
    out = Path(args.out)
    failed, show = [], _progress_printer("predicting")
    for k, (rel, load) in enumerate(frames):
        try:
            image = load()
        except DatasetError as exc:
            failed.append(str(exc))
            continue
        probs = predict_any(model, image, device, precision=precision)
        mask = probs.argmax(0).astype(np.uint8)
        if args.min_confidence > 0:
            mask = keep_confident(mask, probs.max(axis=0), args.min_confidence)
        target = out / rel.with_suffix(".png")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(target)
            if args.probs:
                np.save(target.with_name(target.stem + "_probs.npy"), probs.astype(np.float16))
        except OSError as exc:
            raise CliError(f"{target}: could not be written ({exc.strerror or exc})") from None
        show(k + 1, len(frames))
    print(
        f"wrote {len(frames) - len(failed)} mask(s) to {out}"
        + (" with class probabilities" if args.probs else "")
    )
    if failed:
        print(f"{len(failed)} file(s) could not be read:", *failed, sep="\n  ", file=sys.stderr)
        return 2
    return 0


def submission_lines(masks: np.ndarray):
    """Yield the competition CSV: ``id,0,...,H*W-1`` then one row per mask (row-major)."""
    n, h, w = masks.shape
    yield "id," + ",".join(map(str, range(h * w))) + "\n"
    if masks.max(initial=0) > 9:
        raise ValueError("class ids above 9 cannot use the fast single-digit writer")
    row = np.full(2 * h * w, ord(","), np.uint8)
    for i in range(n):
        row[1::2] = masks[i].reshape(-1) + ord("0")
        yield f"{i}" + row.tobytes().decode("ascii") + "\n"


def cmd_submit(args: argparse.Namespace) -> int:
    from .inference import predict_arrays

    dataset = load_dataset(args)
    if dataset.test_images is None:
        raise CliError(f"{args.dataset}: has no test_set; a submission predicts the test images")
    _, model, device, _, precision = _load_model(args)
    result = predict_arrays(
        model,
        dataset.test_images,
        args.batch_size,
        device,
        progress=_progress_printer("predicting"),
        precision=precision,
    )
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "w", newline="") as f:
            for line in submission_lines(result["masks"]):
                f.write(line)
        tmp.replace(out)
    except OSError as exc:
        raise CliError(f"{out}: could not be written ({exc.strerror or exc})") from None
    print(f"wrote {out}: {len(result['masks'])} rows")
    return 0


def register(sub) -> None:
    def inference_parser(name: str, help: str, splits: tuple, default: str, inputs: bool = False):
        q = sub.add_parser(name, help=help)
        add_dataset_args(q, inputs=inputs)
        q.add_argument("--checkpoint", required=True, help="a checkpoint written by mars-trainer train")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
        q.add_argument(
            "--precision",
            default="auto",
            choices=["auto", "fp32", "bf16"],
            help="auto: bf16 on GPUs and on CPUs that compute bf16 natively, else fp32",
        )
        q.add_argument(
            "--batch-size",
            type=positive_int,
            help=f"images per forward pass; default {PREDICT_BATCH} of 64x128, as many pixels for "
            "other sizes (one at a time from 512x512 up)",
        )
        if splits:
            q.add_argument(
                "--split", choices=splits, default=default, help=f"which images (default {default})"
            )
        return q

    q = inference_parser("evaluate", "per-class IoU of a checkpoint", ("val", "train", "all"), "val")
    q.add_argument(
        "--json",
        action="store_true",
        help='print {"iou", "miou", "miou_keras", "pixel_accuracy", "confusion", "images"}',
    )
    q.add_argument(
        "--no-corrections",
        action="store_true",
        help="score the masks as they are, excluded images too (by default the dataset's corrections "
        "apply, as in training's validation)",
    )
    q.set_defaults(func=cmd_evaluate)
    q = inference_parser(
        "predict",
        "predict masks: a dataset into an .npz, or image files and folders into PNG masks",
        ("test", "val", "train", "all"),
        "test",
        inputs=True,
    )
    q.add_argument(
        "--out",
        required=True,
        help="an .npz (key masks (N, H, W) uint8) for a dataset; else a folder that gets one PNG "
        "mask per input image, same name and size, values 0-4",
    )
    q.add_argument(
        "--probs",
        action="store_true",
        help="also write class probabilities: key probs (N, C, H, W) float16, or NAME_probs.npy (C, H, W)",
    )
    q.add_argument(
        "--min-confidence",
        type=_probability,
        default=0.0,
        help="pixels whose predicted class has a lower probability become 0 (not labelled); default 0: keep all",
    )
    q.set_defaults(func=cmd_predict)
    q = inference_parser("submit", "write the competition CSV for the test_set", (), "")
    q.add_argument("--out", required=True, help="output .csv")
    q.set_defaults(func=cmd_submit)
