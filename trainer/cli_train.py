"""``mars-trainer train | evaluate | predict | submit``.

Config flags are generated from :class:`~trainer.config.TrainConfig`'s fields, so the
CLI, TOML files and the GUI form can never disagree about names or defaults.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from .classes import CLASSES
from .cli_common import CliError, add_dataset_args, load_dataset
from .config import PREDICT_BATCH, PRESETS, TrainConfig, build


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_CONTROLLED = {"epochs", "minutes", "device", "seed"}  # shown in the main group


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    main = p.add_argument_group("run")
    main.add_argument(
        "--preset", choices=list(PRESETS), help="starting point (default: gpu on CUDA, else cpu)"
    )
    main.add_argument("--config", help="a TOML file of config keys (top level or a [train] table)")
    main.add_argument("--resume", help="continue from this checkpoint (its split and optimiser state)")
    group = p.add_argument_group("config (override preset and --config)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        target = main if f.name in _CONTROLLED else group
        helptext = f"{f.metadata.get('help', '')} (default {f.default!r})".replace("%", "%%")
        if isinstance(f.default, bool):
            target.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
        else:
            target.add_argument(
                flag,
                dest=f.name,
                type=type(f.default),
                default=None,
                choices=f.metadata.get("choices"),
                help=helptext,
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.epochs is not None and args.minutes is not None:
        raise CliError("give --epochs or --minutes, not both")
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.minutes is not None:
        overrides["epochs"] = 0
    import torch

    device_kind = args.device or "auto"
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    return build(args.preset, args.config, overrides, device_kind=device_kind)


def _iou_table(iou: list, miou: float) -> str:
    def fmt(v):
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.3f}"

    names = " ".join(f"{c.name:>9}" for c in CLASSES)
    values = " ".join(f"{fmt(v):>9}" for v in iou)
    return f"  IoU {names}      mIoU(1-4)\n      {values}   {fmt(miou)}"


class Progress:
    """One live line on a terminal; a line every few seconds when piped to a file."""

    def __init__(self, stream=None) -> None:
        # No stderr at all (a GUI launcher, pythonw): progress goes nowhere.
        self.stream = stream or sys.stderr or io.StringIO()
        self.tty = self.stream.isatty()
        self.last = 0.0
        self.miou = float("nan")

    def step(self, e) -> None:
        eta = "?" if e.eta_s is None else time.strftime("%H:%M:%S", time.gmtime(e.eta_s))
        miou = "-" if math.isnan(self.miou) else f"{self.miou:.3f}"
        width = 24
        filled = int(width * e.progress)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"epoch {e.epoch + 1} [{bar}] {100 * e.progress:3.0f}% loss {e.loss:.4f} "
            f"mIoU {miou} {e.images_per_s:6.1f} img/s ETA {eta}"
        )
        now = time.time()
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
        elif now - self.last > 10:
            self.stream.write(line + "\n")
            self.last = now

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import TrainControl

    cfg = config_from_args(args)
    dataset = load_dataset(args)
    # Under torchrun only rank 0 talks; the others train silently.
    quiet = int(os.environ.get("RANK", "0")) != 0
    progress = Progress()
    status = 0
    control = TrainControl()

    def on_interrupt(signum, frame):
        # First Ctrl-C: stop after the current step and save a checkpoint. Second: abort.
        if control.stop_requested:
            raise KeyboardInterrupt
        progress.line("stopping after this step (Ctrl-C again to abort without saving)")
        control.request_stop()

    store = None
    if not args.no_corrections:
        from .cli_common import open_store

        store = open_store(dataset, None)
        if store is not None and not quiet:
            edited, excluded = store.snapshot()
            progress.line(
                f"using corrections from {store.path}: {len(edited)} edited, {len(excluded)} excluded"
            )
    previous = (
        signal.signal(signal.SIGINT, on_interrupt)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        status = _run_training(dataset, cfg, args, control, progress, quiet, store)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return status


def _run_training(dataset, cfg, args, control, progress, quiet, store=None) -> int:
    from .engine import fit

    status = 0
    for event in fit(dataset, cfg, args.run_dir, resume=args.resume, control=control, corrections=store):
        kind = event.kind
        if kind == "failed":
            status = 1
        elif kind == "stopped":
            status = 130
        if quiet:
            continue
        if kind == "started":
            progress.line(
                f"training on {event.device_name} ({event.device}, {event.precision}: "
                f"{event.precision_reason}), {event.train_images} training / "
                f"{event.val_images} validation images, {event.parameters:,} parameters"
                + (f", {event.world_size} processes" if event.world_size > 1 else "")
                + (f", resumed at epoch {event.start_epoch + 1}" if event.resumed_from else "")
            )
        elif kind == "step":
            progress.step(event)
        elif kind == "data_update" and (event.corrected or event.excluded):
            progress.line(
                f"epoch {event.epoch + 1}: training on {event.corrected} corrected masks, {event.excluded} excluded images"
            )
        elif kind == "validation":
            progress.miou = event.miou
            progress.line(f"epoch {event.epoch + 1}: validation (best mIoU {event.best_miou:.3f})")
            progress.line(_iou_table(event.iou, event.miou))
        elif kind == "finished":
            progress.line(
                f"finished ({event.reason}) in {event.seconds:.0f} s: best mIoU {event.best_miou:.3f}; "
                f"best checkpoint {event.best_checkpoint}"
            )
        elif kind == "stopped":
            progress.line(f"stopped at epoch {event.epoch + 1}; checkpoint {event.checkpoint}")
        elif kind == "failed":
            progress.line(f"error: {event.message}")
            if event.last_good_checkpoint:
                progress.line(f"last good checkpoint: {event.last_good_checkpoint}")
    return status


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


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .inference import confusion_on
    from .metrics import nan_to_none

    dataset = load_dataset(args)
    data, model, device, dist, precision = _load_model(args)
    idx = _split_indices(data, args.split, len(dataset), args.checkpoint)
    images = torch.from_numpy(dataset.images).to(device)
    masks = torch.from_numpy(dataset.masks).to(device)
    result = confusion_on(model, images, masks, idx, args.batch_size, dist, precision).compute()
    result["images"] = len(idx)
    if not dist.is_main:
        return 0
    if args.json:
        print(json.dumps(nan_to_none(result)))
    else:
        print(f"{args.split} split: {len(idx)} images")
        print(_iou_table(result["iou"], result["miou"]))
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
    from .inference import predict_arrays

    out = Path(args.out)
    if out.suffix != ".npz":
        raise CliError(f"{out}: the output must end in .npz")
    dataset = load_dataset(args)
    data, model, device, _, precision = _load_model(args)
    images = _predict_images(args, dataset, data)
    result = predict_arrays(
        model,
        images,
        args.batch_size,
        device,
        with_probs=args.probs,
        progress=_progress_printer("predicting"),
        precision=precision,
    )
    try:
        np.savez_compressed(out, **result)
    except OSError as exc:
        raise CliError(f"{out}: could not be written ({exc.strerror or exc})") from None
    print(f"wrote {out}: masks {result['masks'].shape}" + (" and probs" if args.probs else ""))
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
    p = sub.add_parser("train", help="train a U-Net; writes a run directory with events and checkpoints")
    add_dataset_args(p)
    p.add_argument("--run-dir", required=True, help="where the config, events and checkpoints go")
    p.add_argument(
        "--no-corrections",
        action="store_true",
        help="ignore the dataset's saved corrections and exclusions (used by default when present)",
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    def inference_parser(name: str, help: str, splits: tuple, default: str):
        q = sub.add_parser(name, help=help)
        add_dataset_args(q)
        q.add_argument("--checkpoint", required=True, help="a checkpoint written by mars-trainer train")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
        q.add_argument(
            "--precision",
            default="auto",
            choices=["auto", "fp32", "bf16"],
            help="auto: bf16 on GPUs and on CPUs that compute bf16 natively, else fp32",
        )
        q.add_argument(
            "--batch-size", type=_positive_int, default=PREDICT_BATCH, help=f"default {PREDICT_BATCH}"
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
    q.set_defaults(func=cmd_evaluate)
    q = inference_parser("predict", "predict masks into an .npz", ("test", "val", "train", "all"), "test")
    q.add_argument("--out", required=True, help="output .npz with key masks (N, H, W) uint8")
    q.add_argument("--probs", action="store_true", help="also store probs (N, C, H, W) float16")
    q.set_defaults(func=cmd_predict)
    q = inference_parser("submit", "write the competition CSV for the test_set", (), "")
    q.add_argument("--out", required=True, help="output .csv")
    q.set_defaults(func=cmd_submit)
