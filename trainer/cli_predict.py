"""``mars-trainer predict`` and ``submit``: masks of a trained checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .cli_common import (
    CliError,
    add_overwrite_arg,
    inference_parser,
    load_dataset,
    load_model,
    progress_printer,
    split_indices,
)
from .outputs import check_output, dataset_inputs, written, written_files


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text!r}")
    return value


def _predict_images(args, dataset, data):
    if args.split == "test":
        if dataset.test_images is None:
            raise CliError(f"{args.dataset}: has no test_set to predict; use --split val, train or all")
        return dataset.test_images
    return dataset.images[split_indices(data, args.split, len(dataset), args.checkpoint)]


def cmd_predict(args: argparse.Namespace) -> int:
    if str(args.out).endswith(".npz"):
        return _predict_dataset(args)
    return _predict_files(args)


def _predict_dataset(args: argparse.Namespace) -> int:
    from .inference import keep_confident, predict_arrays

    if len(args.inputs) != 1:
        raise CliError("an .npz output takes one dataset; to predict image files give an output folder")
    args.dataset = args.inputs[0]
    inputs = [*dataset_inputs(args.dataset), args.checkpoint]
    out = check_output(args.out, inputs, args.overwrite)
    dataset = load_dataset(args)
    data, model, device, _, precision = load_model(args, dataset)
    images = _predict_images(args, dataset, data)
    result = predict_arrays(
        model,
        images,
        args.batch_size,
        device,
        with_probs=args.probs or args.min_confidence > 0,
        progress=progress_printer("predicting"),
        precision=precision,
    )
    if args.min_confidence > 0:
        result["masks"] = keep_confident(result["masks"], result["probs"].max(axis=1), args.min_confidence)
    if not args.probs:
        result.pop("probs", None)
    with written(out, inputs, args.overwrite) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **result)
    print(f"wrote {out}: masks {result['masks'].shape}" + (" and probs" if args.probs else ""))
    return 0


def _frames(args):
    """(name to write, image loader) for each input: image files and folders of them, or
    the frames of one zarr dataset (``--split test``: its unlabelled frames; else all);
    and the dataset (None for image files)."""
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
        return [(Path(stored.names[i]), lambda i=i: stored.image(i)) for i in rows], stored
    from .images import IMAGE_SUFFIXES

    for given in map(Path, args.inputs):
        if given.is_file() and given.suffix.lower() not in IMAGE_SUFFIXES:
            raise CliError(
                f"{given}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); a dataset is predicted "
                "into an .npz (--out NAME.npz)"
            )
    try:
        files = image_files(args.inputs)
    except DatasetError as exc:
        raise CliError(str(exc)) from None
    return [(rel, lambda path=path: read_image(path)) for path, rel in files], None


def _predict_files(args: argparse.Namespace) -> int:
    """One PNG mask (values 0-4, the input's size) per input image, images larger than a
    megapixel by overlapping tiles; unreadable files are listed at the end and make the
    exit code 2, after every readable one is written."""
    from PIL import Image

    from .dataset import DatasetError
    from .inference import keep_confident
    from .tiling import predict_any

    out = Path(args.out)
    inputs = [*dataset_inputs(*args.inputs), args.checkpoint]
    check_output(out, inputs, overwrite=True, what="output folder")
    frames, stored = _frames(args)
    names = [rel.with_suffix(".png") for rel, _ in frames]
    if args.probs:
        names += [n.with_name(n.stem + "_probs.npy") for n in names]
    _, model, device, _, precision = load_model(args, stored)
    failed, show = [], progress_printer("predicting")
    with written_files(out, names, inputs, args.overwrite) as tmp:
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
            target = tmp / rel.with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                Image.fromarray(mask).save(f, format="PNG")
            if args.probs:
                np.save(target.with_name(target.stem + "_probs.npy"), probs.astype(np.float16))
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
    if masks.max(initial=0) > 9:  # a table of more than ten classes: ids of two digits
        for i in range(n):
            yield f"{i}," + ",".join(map(str, masks[i].reshape(-1).tolist())) + "\n"
        return
    row = np.full(2 * h * w, ord(","), np.uint8)
    for i in range(n):
        row[1::2] = masks[i].reshape(-1) + ord("0")
        yield f"{i}" + row.tobytes().decode("ascii") + "\n"


def cmd_submit(args: argparse.Namespace) -> int:
    from .inference import predict_arrays

    inputs = [*dataset_inputs(args.dataset), args.checkpoint]
    out = check_output(args.out, inputs, args.overwrite)
    dataset = load_dataset(args)
    if dataset.test_images is None:
        raise CliError(f"{args.dataset}: has no test_set; a submission predicts the test images")
    _, model, device, _, precision = load_model(args, dataset)
    result = predict_arrays(
        model,
        dataset.test_images,
        args.batch_size,
        device,
        progress=progress_printer("predicting"),
        precision=precision,
    )
    with written(out, inputs, args.overwrite) as tmp, open(tmp, "w", newline="") as f:
        for line in submission_lines(result["masks"]):
            f.write(line)
    print(f"wrote {out}: {len(result['masks'])} rows")
    return 0


def register(sub) -> None:
    q = inference_parser(
        sub,
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
    add_overwrite_arg(q, "replace masks (or an .npz) already at --out")
    q.set_defaults(func=cmd_predict)
    q = inference_parser(sub, "submit", "write the competition CSV for the test_set", (), "")
    q.add_argument("--out", required=True, help="output .csv")
    add_overwrite_arg(q)
    q.set_defaults(func=cmd_submit)
