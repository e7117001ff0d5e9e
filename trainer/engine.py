"""The training loop: ``fit()`` is a generator of events, shared by the CLI and the GUI.

Design (docs/figures.md has the measured figures):

* The whole dataset lives on the training device as uint8; batches are gathered with an
  index tensor on that device. No DataLoader, no worker processes, no host copies.
* Augmentation is batched on the device (``augment.py``); oversampling draws an epoch's
  indices with ``torch.multinomial`` from per-image weights.
* channels_last on CPUs and GPUs; bf16 autocast where the hardware computes bf16
  natively (``--precision`` overrides), chosen once and stated in the ``Started`` event.
* Under torchrun each process takes its slice of the epoch's draws, DDP averages the
  gradients, confusion matrices are summed, and only rank 0 writes the run directory.
  Between steps the ranks agree on failures and stop requests (``device.Peers``).
* On a GPU (one process, images in memory) the whole step is replayed as one CUDA graph
  (``cuda_graph.py``): the host's launches of a thousand small kernels set the pace otherwise.
* The loss and a non-finite-gradient flag are read back to the host only every
  ``log_every`` steps (no GPU sync per step); before any checkpoint is written every
  weight and optimiser tensor is checked, so no checkpoint ever holds a NaN.
* Every random draw of a step is seeded from (seed, epoch, batch, rank), so a run
  stopped mid-epoch and resumed makes exactly the steps the uninterrupted run makes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import events as ev
from .allocator import keep_freed_memory
from .augment import oversampling_weights
from .checkpoint import adopt_best, check_classes, check_compatible, load_checkpoint
from .config import TrainConfig, parse_loss_spec
from .control import RunState, TrainControl
from .crops import crop_source
from .cuda_graph import GraphedStep, conform_optimizer, graph_reason
from .dataset import Dataset, DatasetError
from .device import (
    Peers,
    TrainingFailure,
    device_name,
    init_distributed,
    resolve_device,
    resolve_precision,
    uses_channels_last,
)
from .epoch_corrections import EpochCorrections
from .epoch_end import STOPPED, EpochEnd, describe_failure
from .epoch_steps import EpochSteps
from .formats.zarr_dataset import StoredDataset
from .inference import prepare_model, stratified_split
from .losses import LossParams, SegmentationLoss, frequency_class_weights
from .model import build_model, count_parameters
from .previews import Previews
from .runs import RunDir, RunDirError
from .stats import class_pixel_counts, class_presence


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CPU and CUDA updates every parameter in one pass (about
    half the time of the per-tensor loop on CPU), other devices take PyTorch's default."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


class _Trainer(EpochSteps, EpochEnd, Previews, EpochCorrections):
    """The state and the named steps of one run; :func:`fit` composes them."""

    def __init__(self, dataset, cfg, run_dir, control, resume, corrections) -> None:
        if dataset.masks is None or len(dataset) < 2:
            raise DatasetError(f"{dataset.source}: training needs at least 2 labelled images")
        self.cfg, self.control, self.corrections = cfg, control, corrections
        self.dataset = dataset
        self.dist = init_distributed(cfg.device)
        self.device = device = resolve_device(cfg.device, self.dist.local_rank)
        self.precision = resolve_precision(cfg.precision, device)
        if cfg.threads and device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.peers = Peers(self.dist)
        self.runs = self._open_run_dir(run_dir, resume)
        self.resumed_from = str(resume) if resume else None
        self.stored = dataset if isinstance(dataset, StoredDataset) else None
        self.classes = dataset.classes
        self.presence = (
            dataset.class_pixels > 0
            if self.stored is not None
            else class_presence(dataset.masks, len(self.classes))
        )
        data = load_checkpoint(resume) if resume else None
        self._split(data)
        self.n_labelled = len(dataset)
        self.images = self.masks = self.base_masks = None
        if self.stored is None:
            # With a corrections store, the unlabelled images ride along (after the labelled
            # ones, as the store numbers them): a label saved for one joins the next epoch.
            images, self.base_masks = (
                dataset.stacked() if corrections is not None else (dataset.images, dataset.masks)
            )
            self.images = torch.from_numpy(images).to(device)
            # A copy when corrections may rewrite rows: on the CPU .to() would share the caller's array.
            self.masks = torch.from_numpy(self.base_masks).to(device, copy=corrections is not None)
        self.crops, self.data_mode = crop_source(
            self.cfg,
            self.stored,
            self.images,
            self.base_masks,
            self.n_labelled,
            self.train_idx,
            self.dist.rank,
            len(self.classes),
        )
        if self.crops is None:
            self.data_mode += f" on {device.type}"
        no_graph = graph_reason(cfg, device, self.dist.world, self.crops)
        if device.type == "cuda":
            self.data_mode += (
                f"; steps run eagerly ({no_graph})" if no_graph else "; each step replayed as one CUDA graph"
            )
        self._build(data, capturable=no_graph is None)
        self.graphed = GraphedStep(self) if no_graph is None else None
        self.seen_version = None
        self.sample_weights = self._sample_weights()
        # The store's first reading, before the epoch is sized: an epoch is as many steps as
        # the images it trains on make (not counting the excluded; counting those labelled since).
        self.first_update = self.reload_corrections()
        self.leave_out_absent()
        self.batch = self.crops.batch if self.crops is not None else cfg.batch_size  # images a step
        self.per_step = self.batch * self.dist.world
        self.steps_per_epoch = max(1, math.ceil(len(self.train_idx) / self.per_step))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.budget_s = cfg.minutes * 60
        # The last validation's length on the budget's clock (before the first, an estimate:
        # estimate_validation): a budget ends its training that much early, so that the
        # final validation fits in it too (frames from disk: minutes).
        self.validation_s = 0.0
        self.validation_timed = False  # by a validation or an estimate, on every rank alike
        self.step_clock = 0.0  # the budget's clock at the step's start, agreed by the ranks
        self.step_s = 0.0  # the last step's length on that clock, start to start
        self.t0 = time.perf_counter() - self.state.elapsed_s
        # What this process itself did: steps and CPU, for a run that ends having barely begun
        self.start_step, self.cpu0, self.wall0 = self.state.step, time.process_time(), time.perf_counter()
        self.paused_s = 0.0  # time held by control.pause: neither run time nor budget
        self.clock0 = control.clock() if control.clock is not None else 0.0
        self.last_preview = -math.inf
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.epoch_loss = torch.zeros((), device=device)
        self.epoch_loss_n = 0
        self.lr = cfg.lr
        if data is not None and self.runs is not None:  # last: nothing after it refuses the run
            adopt_best(self.runs.best, resume, self.state.best)  # a new run directory gets the best so far

    def _open_run_dir(self, run_dir, resume) -> RunDir | None:
        """Rank 0's run directory; one it cannot use raises :class:`RunDirError` on every
        rank (the others would wait for it in their first collective)."""
        runs, problem = None, None
        if run_dir is not None and self.dist.is_main:
            try:
                runs = RunDir(run_dir, resume)
            except RunDirError as exc:
                problem = str(exc)
        problem = self.peers.share(problem)
        if problem is not None:
            raise RunDirError(problem)
        return runs

    def _split(self, data: dict | None) -> None:
        """The checkpoint's split when resuming, else a new stratified one."""
        if data is not None:
            check_compatible(data, self.cfg, self.resumed_from)
            check_classes(data, self.classes, self.resumed_from, self.dataset.source)
            train_idx, val_idx = np.asarray(data["train_indices"]), np.asarray(data["val_indices"])
            if max(train_idx.max(), val_idx.max()) >= len(self.dataset):
                raise DatasetError(
                    f"{self.resumed_from}: the checkpoint's split does not fit this dataset "
                    f"of {len(self.dataset)} images"
                )
        else:
            train_idx, val_idx = stratified_split(self.presence, self.cfg.val_fraction, self.cfg.seed)
        self.base_train_idx, self.base_val_idx = train_idx, val_idx
        self.train_idx, self.val_idx = train_idx, val_idx

    def _build(self, data: dict | None, capturable: bool = False) -> None:
        """Loss, model and optimiser, restored from the checkpoint when resuming; the
        optimiser ``capturable`` for a step replayed as a CUDA graph."""
        cfg, device = self.cfg, self.device
        pixels = (
            self.stored.class_pixels[self.train_idx].sum(axis=0)
            if self.stored is not None
            else class_pixel_counts(self.dataset.masks, self.train_idx, len(self.classes))
        )
        weights = frequency_class_weights(pixels, cfg.background_weight, cfg.class_weighting)
        # What each class weighs while it is in the training labels: leave_out_absent gives
        # the absent ones 0 (an overlap term such as Dice would otherwise average them in).
        self.base_weights = list(weights)
        self.criterion = SegmentationLoss(parse_loss_spec(cfg.loss), weights, LossParams.from_config(cfg)).to(
            device
        )
        self.model = prepare_model(build_model(cfg, len(self.classes)), device)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.state = RunState()
        if data is not None:
            self.model.load_state_dict(data["model"])
            self.optimizer.load_state_dict(data["optimizer"])
            self.state = RunState.from_checkpoint(data)
            if "rng_state" in data:
                torch.set_rng_state(data["rng_state"])
        conform_optimizer(self.optimizer, capturable, device)
        self.train_model = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)

    # -- small helpers
    def emit(self, event: ev.Event) -> ev.Event:
        if self.runs is not None:
            self.runs.write_event(event)
        return event

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.paused_s

    def used(self) -> float:
        """What the time budget counts: the run's own time, or the control's clock."""
        if self.control.clock is not None:
            return self.state.elapsed_s + self.control.clock() - self.clock0
        return self.elapsed()

    def out_of_time(self) -> bool:
        """Whether another step and then the final validation would end past the budget."""
        return bool(self.budget_s) and self.used() + self.step_s + self.validation_s > self.budget_s

    def leave_out_absent(self) -> bool:
        """Leave the classes the training images do not hold (after exclusions and
        corrections) out of the model's predictions; True when that changed the set."""
        held = self.presence[self.train_idx].any(axis=0) if len(self.train_idx) else np.zeros(0, bool)
        absent = [c for c in range(1, len(self.classes)) if c >= len(held) or not held[c]]
        changed = absent != self.model.absent()  # a resumed model holds its checkpoint's
        if changed:
            self.model.set_absent(absent)
        weights = torch.tensor(self.base_weights, dtype=torch.float32)
        weights[absent] = 0.0
        if weights.max() > 0:  # in place: a step replayed as a CUDA graph reads the buffer
            self.criterion.class_weights.copy_(weights)
        return changed

    def _sample_weights(self) -> torch.Tensor:
        return torch.as_tensor(oversampling_weights(self.presence[self.train_idx], self.cfg.oversample))

    def started(self) -> ev.Started:
        if self.runs is not None:
            self.runs.write_start(  # the split itself, and the classes
                self.cfg, self.base_train_idx, self.base_val_idx, self.classes, self.model.absent()
            )
        return ev.Started(
            self.cfg.to_dict(), str(self.device), device_name(self.device), len(self.train_idx),
            len(self.val_idx), count_parameters(self.model), self.dist.world, self.resumed_from,
            self.state.epoch, self.precision.name, self.precision.reason, uses_channels_last(self.device),
            self.data_mode, self.classes.records(), self.model.absent(),
        )  # fmt: skip


def fit(
    dataset: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    control: TrainControl | None = None,
    resume: str | Path | None = None,
    corrections=None,
) -> Iterator[ev.Event]:
    """Train a U-Net on ``dataset`` and yield events until a terminal one
    (:class:`~trainer.events.Finished`, ``Stopped`` or ``Failed``).

    ``corrections`` (a :class:`~trainer.corrections.CorrectionStore`, optional) is read
    at the start of every epoch: edited masks replace the originals and excluded images
    leave both splits, without restarting (a ``DataUpdate`` event says so).

    ``resume`` continues a checkpoint exactly where it was written, mid-epoch included.

    Bad input (a dataset without labels, a missing GPU, an unwritable run directory, a
    checkpoint of another architecture) raises before the first event; failures during
    training (a non-finite loss or gradient, out of memory, an error on another rank)
    are reported as a ``Failed`` event that names the last good checkpoint.
    """
    keep_freed_memory()
    run = _Trainer(dataset, cfg, run_dir, control or TrainControl(), resume, corrections)
    yield run.emit(run.started())
    try:
        if not run.budget_s and run.state.epoch >= cfg.epochs:
            reason = "completed"  # resumed from the end of a run as long as this one
        else:
            while True:
                update, run.first_update = run.first_update or run.reload_corrections(), None
                if update is not None:
                    yield run.emit(update)
                if run.budget_s and not run.validation_timed:
                    short = run.estimate_validation()
                    if short is not None:
                        yield run.emit(short)
                if (yield from run.run_epoch()):
                    return
                reason = yield from run.end_of_epoch()
                if reason == STOPPED:
                    return
                if reason is not None:
                    break
    except (FloatingPointError, TrainingFailure) as exc:
        hint = " Try a lower --lr." if "finite" in str(exc) or "nan" in str(exc).lower() else ""
        # The message is the same on every rank; which checkpoint is kept (rank 0 writes
        # them) is the event's own field, said by the CLI and napari where there is one.
        message = f"{exc}; training stopped.{hint}"
        yield run.emit(ev.Failed(message, run.state.epoch, run.state.step, run.last_good()))
        return
    except torch.cuda.OutOfMemoryError as exc:
        yield run.emit(
            ev.Failed(describe_failure(exc, cfg), run.state.epoch, run.state.step, run.last_good())
        )
        return
    finally:
        if run.runs is not None:
            run.runs.close()  # reopened in append mode for the final event below
    yield run.emit(run.finished(reason))
    if run.runs is not None:
        run.runs.close()


__all__ = ["RunState", "TrainControl", "fit"]
