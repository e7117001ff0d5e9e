"""``mars-trainer train | evaluate | predict | submit``.

Config flags are generated from :class:`~trainer.config.TrainConfig`'s fields, so the
CLI, TOML files and the GUI form can never disagree about names or defaults.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

from .cli_common import CliError, add_dataset_args, checkpoint_arg, iou_table, load_dataset
from .config import PRESETS, TrainConfig, build
from .events import cpu_share_text

_CONTROLLED = {"epochs", "minutes", "device", "seed"}  # shown in the main group


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    main = p.add_argument_group("run")
    main.add_argument(
        "--preset", choices=list(PRESETS), help="starting point (default: gpu on CUDA, else cpu)"
    )
    main.add_argument("--config", help="a TOML file of config keys (top level or a [train] table)")
    main.add_argument(
        "--resume",
        type=checkpoint_arg("last"),
        help="continue from this checkpoint (its split and optimiser state), or from a run directory's last.pt",
    )
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


class Progress:
    """One live line on a terminal; a line every few seconds when piped to a file."""

    def __init__(self, stream=None) -> None:
        # No stderr at all (a GUI launcher, pythonw): progress goes nowhere.
        self.stream = stream or sys.stderr or io.StringIO()
        self.tty = self.stream.isatty()
        self.last = 0.0
        self.miou = float("nan")
        self.epoch = 0
        self.said_busy = ""  # the last word on the CPU the run gets, said once until it changes

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
        self.epoch = e.epoch
        self.note(line)

    def note(self, line: str) -> None:
        """The live line: rewritten on a terminal, written every 10 s or so to a file."""
        now = time.time()
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
        elif now - self.last > 10:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def _default_run_dir(dataset: str) -> str:
    """``runs/NAME-TIME``, new, in the current folder, said on the first line. Under
    torchrun every rank must write to one directory, so there it must be given."""
    from .runs import new_run_dir

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError("under torchrun give --run-dir (every process must write to the same one)")
    from .outputs import dataset_inputs, refuse_inputs

    name = Path(dataset).stem if not str(dataset).startswith("synthetic") else "synthetic"
    # refused before anything is made: runs/ must not lie inside the dataset's folder
    refuse_inputs("runs", dataset_inputs(dataset), what="--run-dir (runs/ here is inside the dataset)")
    try:
        path = new_run_dir("runs", f"{name or 'run'}-")
    except OSError as exc:
        raise CliError(
            f"runs: cannot create a run directory here ({exc.strerror or exc}); give --run-dir"
        ) from None
    print(f"run directory: {path}", file=sys.stderr)
    return str(path)


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import TrainControl
    from .outputs import dataset_inputs, refuse_inputs

    cfg = config_from_args(args)
    if args.run_dir is not None:
        refuse_inputs(args.run_dir, dataset_inputs(args.dataset), what="--run-dir")
    dataset = load_dataset(args, lazy=True)
    if args.run_dir is None:  # made only once the dataset has been read
        args.run_dir = _default_run_dir(args.dataset)
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
            orphans = store.orphans()
            progress.line(
                f"using corrections from {store.path}: {len(edited)} edited, {len(excluded)} excluded"
                + (f" ({len(orphans)} more for images no longer in the dataset)" if orphans else "")
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


def absent_line(classes, absent) -> str:
    """What the person is told of the classes left out of predictions."""
    if not absent:
        return "every class is in the training labels: all are predicted"
    names = ", ".join(classes[c].name for c in absent)
    return f"not in the training labels, so never predicted and not scored unless labelled in validation: {names}"


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
            if event.data:
                progress.line(f"data: {event.data}")
            if event.absent_classes:
                progress.line(absent_line(dataset.classes, event.absent_classes))
        elif kind == "step":
            progress.step(event)
            busy = cpu_share_text(event.cpu_cores, event.threads)
            if busy and busy != progress.said_busy:
                progress.note(busy)
            progress.said_busy = busy
        elif kind == "progress" and not event.total:  # something to know, not a count
            progress.line(event.text)
        elif kind == "progress":  # a long validation of frames read from disk
            progress.note(f"epoch {progress.epoch + 1}: {event.text}")
        elif kind == "data_update" and (event.corrected or event.excluded or event.newly_labelled):
            progress.line(
                f"epoch {event.epoch + 1}: training on {event.corrected} corrected masks and "
                f"{event.newly_labelled} newly labelled images, {event.excluded} excluded images"
            )
            if event.absent_classes is not None:
                progress.line(absent_line(dataset.classes, event.absent_classes))
        elif kind == "validation":
            progress.miou = event.miou
            progress.line(f"epoch {event.epoch + 1}: validation (best mIoU {event.best_miou:.3f})")
            progress.line(iou_table(event.iou, event.miou, dataset.classes, event.absent))
        elif kind == "finished":
            progress.line(
                f"finished ({event.reason}) in {event.seconds:.0f} s: best mIoU {event.best_miou:.3f}; "
                + (
                    f"best checkpoint {event.best_checkpoint}"
                    if event.best_checkpoint
                    else "no best checkpoint (no validation has finished)"
                )
            )
            if event.note:
                progress.line(f"note: {event.note}")
        elif kind == "stopped":
            progress.line(f"stopped at epoch {event.epoch + 1}; checkpoint {event.checkpoint}")
        elif kind == "failed":
            progress.line(f"error: {event.message}")
            if event.last_good_checkpoint:
                progress.line(f"last good checkpoint: {event.last_good_checkpoint}")
    return status


def register(sub) -> None:
    p = sub.add_parser("train", help="train a U-Net; writes a run directory with events and checkpoints")
    add_dataset_args(p)
    p.add_argument(
        "--run-dir",
        help="where the config, events and checkpoints go (default: a new runs/DATASET-TIME in the current folder)",
    )
    p.add_argument(
        "--no-corrections",
        action="store_true",
        help="ignore the dataset's saved corrections and exclusions (used by default when present)",
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)
