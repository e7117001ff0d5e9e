"""``mars-trainer evaluate``: per-class IoU of a trained checkpoint, the dataset's saved
corrections applied as training's validation applies them."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .cli_common import (
    CliError,
    inference_parser,
    iou_table,
    load_dataset,
    load_model,
    open_store,
    progress_printer,
    split_indices,
)


def _evaluated(args, dataset, data, say: bool = True) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The rows to score (labelled rows, then the unlabelled images labelled since as rows
    ``n + j``) and the corrected masks by row: with the dataset's corrections, as training
    validated, the excluded images left out and corrected masks as the truth; the split's
    own rows and masks with ``--no-corrections``."""
    from .formats import StoredDataset

    n = dataset.n_labelled if isinstance(dataset, StoredDataset) else len(dataset)
    idx = split_indices(data, args.split, n, args.checkpoint)
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
    data, model, device, dist, precision = load_model(args, dataset)
    idx, edited = _evaluated(args, dataset, data, say=dist.is_main)  # said once under torchrun
    if not len(idx):
        raise CliError(
            f"{args.dataset}: every image of the {args.split} split is excluded; nothing to evaluate"
        )
    if isinstance(dataset, StoredDataset):  # frame by frame from disk, large frames by tiles
        show = progress_printer("evaluating") if dist.is_main else lambda done, total: None
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
        batch = args.batch_size or predict_batch(images.shape, device)
        images, masks = torch.from_numpy(images).to(device), torch.from_numpy(masks).to(device)
        result = confusion_on(model, images, masks, np.arange(len(idx)), batch, dist, precision).compute()
    result["images"] = len(idx)
    if not dist.is_main:
        return 0
    if args.json:
        print(json.dumps(nan_to_none(result)))
    else:
        print(f"{args.split} split: {len(idx)} images")
        print(iou_table(result["iou"], result["miou"], data["class_table"], result["absent"]))
        for c, why in sorted(result["left_out"].items()):
            if c:
                print(f"  {data['class_table'][c].name}: not scored, {why}")
        print(f"  mIoU as Keras MeanIoU(ignore_class=0) prints it: {result['miou_keras']:.4f}")
        print(f"  pixel accuracy (background ignored): {result['pixel_accuracy']:.4f}")
    return 0


def register(sub) -> None:
    q = inference_parser(sub, "evaluate", "per-class IoU of a checkpoint", ("val", "train", "all"), "val")
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
