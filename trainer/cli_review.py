"""``mars-trainer audit`` and ``mars-trainer export``: find likely label errors, and write
the corrected dataset."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .cli_common import (
    CliError,
    add_checkpoint_arg,
    add_dataset_args,
    add_overwrite_arg,
    load_dataset,
    open_store,
    say_replaced_store,
)
from .outputs import check_output, dataset_inputs, write_bytes


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit, describe_reason
    from .audit_stored import audit_stored
    from .formats import StoredDataset

    inputs = [*dataset_inputs(args.dataset), args.corrections, args.checkpoint]
    out = check_output(args.out, inputs, args.overwrite)
    if not args.checkpoint and args.folds < 2:
        raise CliError(
            f"--folds must be at least 2 (each model predicts the fold it did not see), got {args.folds}"
        )
    if not args.checkpoint and not args.minutes > 0:
        raise CliError(f"--minutes must be more than 0, got {args.minutes:g}")
    if args.epochs is not None and args.epochs < 1:
        raise CliError(f"--epochs must be at least 1, got {args.epochs}")
    dataset = load_dataset(args, lazy=True)
    store = open_store(dataset, args.corrections)
    started = time.time()
    tty = sys.stderr.isatty()

    def progress(text: str) -> None:
        line = f"audit: {text} ({time.time() - started:.0f} s)"
        sys.stderr.write(("\r" + line.ljust(70)) if tty else line + "\n")
        sys.stderr.flush()

    how = dict(
        checkpoint=args.checkpoint, folds=args.folds, minutes=args.minutes, progress=progress, seed=args.seed,
        epochs=args.epochs or 0,
    )  # fmt: skip
    if isinstance(dataset, StoredDataset):  # read from disk a frame at a time
        ranking = audit_stored(dataset, store, **how)
    else:
        excluded: set[int] = set()
        if store is not None:
            dataset, excluded = store.apply(dataset)
        ranking, _, _ = audit(dataset, excluded=excluded, **how)
    if tty:
        sys.stderr.write("\n")
    write_bytes(out, json.dumps(ranking), inputs=inputs, overwrite=args.overwrite)
    print(f"wrote {out}: {len(ranking)} images ranked; most suspicious:")
    shown_groups: set[tuple[int, ...]] = set()
    lines = 0
    for r in ranking:
        if lines == 12 or r["score"] < 0.01:
            break
        top = r["reasons"][0]
        if top["kind"] in ("duplicate_mask", "near_duplicate_mask") and top["group_size"] > 2:
            group = tuple(top["group"])
            if group in shown_groups:
                continue
            shown_groups.add(group)
            listed = ", ".join(str(i) for i in group[:6]) + (", ..." if len(group) > 6 else "")
            print(f"  images {listed}  score {r['score']:.3f}  {describe_reason(top)}")
        else:
            kinds = ", ".join(describe_reason(x) for x in r["reasons"] if x["score"] >= 0.01) or "-"
            print(f"  image {r['index']:>5}  score {r['score']:.3f}  {kinds}")
        lines += 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import history
    from .formats import write_npz

    out = Path(args.out)
    if out.suffix not in (".npz", ".zarr"):
        raise CliError(f"{out}: the output must end in .npz (the competition's format) or .zarr")
    inputs = [*dataset_inputs(args.dataset), args.corrections]
    check_output(out, inputs, args.overwrite)
    check_output(changelog_path(out), inputs, args.overwrite, what="--out")
    if out.suffix == ".zarr":
        return _export_zarr(args, out, inputs)
    dataset = load_dataset(args)
    store = open_store(dataset, args.corrections)
    edited: dict[int, np.ndarray] = {}
    excluded: set[int] = set()
    if store is not None:
        edited, excluded = store.snapshot()
    masks = dataset.masks.copy()
    changes = []
    n = len(dataset)
    for i, m in sorted(edited.items()):
        if i >= n:
            continue
        changed = int((m != dataset.masks[i]).sum())
        masks[i] = m
        changes.append(
            {"index": i, "action": "mask", "changed_pixels": changed, "history": history(store, i)}
        )
    # Unlabelled images labelled since: appended to training_set (test_set stays whole).
    new_labels = sorted(i for i in edited if i >= n)
    for k, i in enumerate(new_labels):
        changes.append(
            {"index": n + k, "action": "labelled", "unlabelled_index": i - n, "history": history(store, i)}
        )
    for i in sorted(excluded):
        changes.append(
            {
                "index": i,
                "action": "excluded",
                "dropped": bool(args.drop_excluded),
                "history": history(store, i),
            }
        )
    if new_labels:
        rows = np.array(new_labels) - n
        images = np.concatenate([dataset.images, dataset.test_images[rows]])
        masks = np.concatenate([masks, np.stack([edited[i] for i in new_labels])])
    else:
        images = dataset.images
    keep = np.array(
        [
            i
            for i in range(len(images))
            if not (args.drop_excluded and _store_index(i, n, new_labels) in excluded)
        ],
        dtype=np.int64,
    )
    # The real file is float64; keep the dtype people's notebooks expect unless asked.
    write_npz(
        out,
        images[keep],
        masks[keep],
        dataset.test_images,
        args.dtype,
        args.overwrite,
        inputs,
        dataset.classes,
    )
    log = {
        "source": dataset.source,
        "corrections": str(store.path) if store is not None else None,
        "images": int(len(keep)),
        "edited": len(edited) - len(new_labels),
        "newly_labelled": len(new_labels),
        "excluded": len(excluded),
        "dropped_excluded": bool(args.drop_excluded),
        "kept_indices": keep.tolist() if args.drop_excluded else None,
        "changes": changes,
    }
    changelog = _write_changelog(out, log, inputs)
    print(
        f"wrote {out} ({len(keep)} images, {len(edited) - len(new_labels)} corrected masks, "
        f"{len(new_labels)} newly labelled, {len(excluded)} excluded"
        f"{' and dropped' if args.drop_excluded else ''}) and {changelog.name}"
    )
    return 0


def _export_zarr(args: argparse.Namespace, out: Path, inputs: list) -> int:
    from .export import export_zarr

    dataset = load_dataset(args, lazy=True)
    store = open_store(dataset, args.corrections)
    show = None
    if sys.stderr.isatty():

        def show(done: int, total: int) -> None:
            end = "" if done < total else "\n"
            print(f"\rexporting {done}/{total}", end=end, file=sys.stderr, flush=True)

    mapping = getattr(dataset, "attrs", {}).get("mask_mapping", args.mask_mapping)
    log = export_zarr(dataset, store, out, mapping, args.drop_excluded, show)
    changelog = _write_changelog(out, log, inputs)
    print(
        f"wrote {out} ({log['labelled']} labelled and {log['unlabelled']} unlabelled images; "
        f"{log['edited']} corrected masks, {log['newly_labelled']} newly labelled, {log['excluded']} excluded"
        f"{' and dropped' if args.drop_excluded else ''}) and {changelog.name}"
    )
    say_replaced_store(out, log["replaced_store"])
    if log["exclusions_store"]:
        print(
            f"{log['excluded_kept']} excluded images stay excluded in {out.name} "
            f"(its corrections: {log['exclusions_store']})"
        )
    if log["orphans"]:
        print(
            f"not exported: corrections of {len(log['orphans'])} images no longer in the dataset "
            f"(listed in {changelog.name} under orphans)",
            file=sys.stderr,
        )
    return 0


def changelog_path(out: Path) -> Path:
    """``OUT.changelog.json`` beside the export (``fixed.npz.changelog.json``: an export
    to ``fixed.zarr`` has a changelog of its own)."""
    return out.with_name(out.name + ".changelog.json")


def _write_changelog(out: Path, log: dict, inputs: list) -> Path:
    # --overwrite replaces the export's own changelog too; check_output refused it before
    # any work when it was there without --overwrite.
    return write_bytes(changelog_path(out), json.dumps(log, indent=1), inputs=inputs, overwrite=True)


def _store_index(row: int, n: int, new_labels: list[int]) -> int:
    """The store's index of an exported row (rows past ``n`` are newly labelled images)."""
    return row if row < n else new_labels[row - n]


def register(sub) -> None:
    p = sub.add_parser("audit", help="rank images whose mask is probably wrong")
    add_dataset_args(p)
    p.add_argument(
        "--out", required=True, help="output JSON: [{index, score, reasons}], most suspicious first"
    )
    add_checkpoint_arg(
        p,
        required=False,
        help="use this model's predictions (a checkpoint, or a run directory: its best.pt) instead of "
        "training out-of-fold models",
    )
    p.add_argument("--folds", type=int, default=3, help="out-of-fold models to train (default 3)")
    p.add_argument(
        "--minutes", type=float, default=3.0, help="training budget for all folds together (default 3)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="train each out-of-fold model for N epochs instead of --minutes: the same ranking on every run",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="folds and training: the same seed, the same ranking (default 0)"
    )
    p.add_argument("--corrections", help="corrections database (default: the dataset's own)")
    add_overwrite_arg(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "export",
        help="write the dataset with corrections applied: the competition's .npz, or a .zarr dataset",
    )
    add_dataset_args(p)
    p.add_argument(
        "--out",
        required=True,
        help="output .npz (the competition's format) or .zarr (each frame at its own size, by name, "
        "written a frame at a time: any dataset, also one larger than memory); "
        "a .changelog.json goes beside it",
    )
    p.add_argument("--drop-excluded", action="store_true", help="leave excluded images out")
    p.add_argument("--dtype", choices=["float64", "float32", "uint8"], default="float64", help=".npz only")
    add_overwrite_arg(p, "replace an existing --out and its changelog")
    p.add_argument("--corrections", help="corrections database (default: the dataset's own)")
    p.set_defaults(func=cmd_export)
