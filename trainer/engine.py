"""The training loop: ``fit()`` is a generator of events, shared by the CLI and the GUI.

Design (see the README for measured figures):

* The whole dataset lives on the training device as uint8; batches are gathered with an
  index tensor on that device. No DataLoader, no worker processes, no host copies.
* Augmentation is batched on the device (``augment.py``); oversampling draws an epoch's
  indices with ``torch.multinomial`` from per-image weights.
* CUDA: bf16 autocast and channels_last. CPU: fp32.
* Under torchrun each process takes its slice of the epoch's draws, DDP averages the
  gradients, confusion matrices are summed, and only rank 0 writes the run directory.
* The loss is read back to the host only every ``log_every`` steps, so the GPU is not
  synchronised at every step; a NaN is caught at that point (and at each epoch's end)
  before anything is saved, so the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import events as ev
from .augment import augment_batch, oversampling_weights
from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_loss_spec
from .dataset import Dataset, DatasetError
from .device import device_name, init_distributed, resolve_device
from .inference import autocast_for, confusion_on, predict_arrays, stratified_split, to_input
from .losses import SegmentationLoss, frequency_class_weights
from .model import build_model, count_parameters
from .runs import RunDir
from .stats import class_pixel_counts, class_presence


@dataclass
class TrainControl:
    """Commands into a running ``fit()``, safe to call from another thread.

    ``poll`` (optional) is called between steps; a process wrapper uses it to read
    commands from a pipe and call the methods below.
    """

    preview_indices: list[int] = field(default_factory=list)
    preview_every_s: float | None = None  # also preview between steps at this interval
    poll: Callable[[], None] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _preview_now: threading.Event = field(default_factory=threading.Event)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_preview(self, indices: list[int]) -> None:
        self.preview_indices = [int(i) for i in indices]
        self._preview_now.set()


def _lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine":
        return warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    return warm


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
    leave the training split, without restarting (a ``DataUpdate`` event says so).

    Bad input (a dataset without labels, a missing GPU, an unwritable run directory, a
    checkpoint of another architecture) raises before the first event; failures during
    training (NaN loss, out of memory) are reported as a ``Failed`` event.
    """
    control = control or TrainControl()
    if dataset.masks is None or len(dataset) < 2:
        raise DatasetError(f"{dataset.source}: training needs at least 2 labelled images")
    dist = init_distributed(cfg.device)
    device = resolve_device(cfg.device, dist.local_rank)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    runs = RunDir(run_dir) if (run_dir is not None and dist.is_main) else None

    presence = class_presence(dataset.masks)
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        check_compatible(state, cfg, resume)
        train_idx, val_idx = np.asarray(state["train_indices"]), np.asarray(state["val_indices"])
        if max(train_idx.max(), val_idx.max()) >= len(dataset):
            raise DatasetError(
                f"{resume}: the checkpoint's split does not fit this dataset of {len(dataset)} images"
            )
    else:
        train_idx, val_idx = stratified_split(presence, cfg.val_fraction, cfg.seed)

    images = torch.from_numpy(dataset.images).to(device)
    # A copy when corrections may rewrite rows: on the CPU .to() would share the caller's array.
    masks = torch.from_numpy(dataset.masks).to(device, copy=corrections is not None)
    weights = frequency_class_weights(
        class_pixel_counts(dataset.masks[train_idx]), cfg.background_weight, cfg.class_weighting
    )
    criterion = SegmentationLoss(
        parse_loss_spec(cfg.loss),
        weights,
        cfg.focal_gamma,
        cfg.tversky_alpha,
        cfg.tversky_beta,
        cfg.focal_tversky_gamma,
    ).to(device)
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, step, best, plateau_factor, stale = 0, 0, -1.0, 1.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state.get("best_miou", -1.0)
        plateau_factor, stale = state.get("plateau_factor", 1.0), state.get("stale", 0)
    train_model = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    base_train_idx = train_idx
    original_masks = dataset.masks
    seen_version = None

    def reload_corrections(epoch: int):
        """Apply the store's current state; returns a DataUpdate event when it changed."""
        nonlocal train_idx, presence, seen_version
        version = corrections.version()
        if version == seen_version:
            return None
        seen_version = version
        edited, excluded = corrections.snapshot()
        effective = original_masks.copy()
        for i, m in edited.items():
            effective[i] = m
        masks.copy_(torch.from_numpy(effective))
        presence = class_presence(effective)
        train_idx = np.array([i for i in base_train_idx if i not in excluded], dtype=np.int64)
        if len(train_idx) == 0:
            raise DatasetError("every training image is excluded")
        return ev.DataUpdate(epoch, len(edited), len(excluded), len(train_idx))

    sample_weights = torch.as_tensor(oversampling_weights(presence[train_idx], cfg.oversample))
    per_step = cfg.batch_size * dist.world
    steps_per_epoch = max(1, math.ceil(len(train_idx) / per_step))
    total_steps = cfg.epochs * steps_per_epoch
    budget_s = cfg.minutes * 60

    def checkpoint(which: str, epoch: int, miou: float | None) -> ev.Checkpoint | None:
        if runs is None:
            return None
        path = runs.best if which == "best" else runs.last
        save_checkpoint(
            path, model=model, config=cfg, optimizer=optimizer.state_dict(), epoch=epoch, step=step,
            best_miou=best, miou=miou if miou is not None and not math.isnan(miou) else -1.0,
            plateau_factor=plateau_factor, stale=stale,
            train_indices=[int(i) for i in train_idx], val_indices=[int(i) for i in val_idx],
        )  # fmt: skip
        return ev.Checkpoint(epoch, step, str(path), which, miou)

    def emit(event: ev.Event) -> ev.Event:
        if runs is not None:
            runs.write_event(event)
        return event

    def last_good() -> str | None:
        if runs is None:
            return None
        return str(runs.last) if runs.last.exists() else (str(runs.best) if runs.best.exists() else None)

    if runs is not None:
        runs.write_start(cfg, train_idx, val_idx)
    yield emit(ev.Started(
        cfg.to_dict(), str(device), device_name(device), len(train_idx), len(val_idx),
        count_parameters(model), dist.world, str(resume) if resume else None, start_epoch,
    ))  # fmt: skip

    t0 = time.perf_counter()
    last_preview = -math.inf
    epoch = start_epoch
    reason = "completed"
    try:
        for epoch in range(start_epoch, cfg.epochs if not budget_s else 10**9):
            if corrections is not None:
                update = reload_corrections(epoch)
                if update is not None:
                    sample_weights = torch.as_tensor(
                        oversampling_weights(presence[train_idx], cfg.oversample)
                    )
                    yield emit(update)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            draws = torch.multinomial(
                sample_weights, steps_per_epoch * per_step, replacement=True, generator=g
            )
            mine = torch.as_tensor(train_idx)[draws[dist.rank :: dist.world]].to(device)
            aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + epoch * 131 + dist.rank)
            train_model.train()
            loss_sum, loss_n, t_log, n_log = torch.zeros((), device=device), 0, time.perf_counter(), 0
            for k in range(steps_per_epoch):
                if control.poll is not None:
                    control.poll()
                if control.stop_requested:
                    ck = checkpoint("last", epoch, None)
                    if ck:
                        yield emit(ck)
                    yield emit(ev.Stopped(epoch, step, ck.path if ck else None))
                    return
                idx = mine[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                x, y = to_input(images[idx], device), masks[idx].long()
                if cfg.augment:
                    x, y = augment_batch(x, y, cfg, aug_gen)
                progress = (time.perf_counter() - t0) / budget_s if budget_s else step / max(total_steps, 1)
                lr = cfg.lr * plateau_factor * _lr_factor(cfg, step, progress)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast_for(device):
                    logits = train_model(x)
                loss = criterion(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                loss_sum += loss.detach()
                loss_n += 1
                n_log += len(idx) * dist.world
                if step % cfg.log_every == 0 or k == steps_per_epoch - 1:
                    mean_loss = (loss_sum / loss_n).item()
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"the loss became {mean_loss} at step {step}")
                    now = time.perf_counter()
                    rate = n_log / max(now - t_log, 1e-9)
                    done = (now - t0) / budget_s if budget_s else step / total_steps
                    eta = (now - t0) * (1 - done) / done if done > 0 else None
                    yield emit(ev.Step(epoch, step, mean_loss, lr, rate, min(done, 1.0), eta))
                    loss_sum.zero_()
                    loss_n, t_log, n_log = 0, now, 0
                if control.preview_indices and (
                    control._preview_now.is_set()
                    or (
                        control.preview_every_s is not None
                        and time.perf_counter() - last_preview >= control.preview_every_s
                    )
                ):
                    control._preview_now.clear()
                    yield emit(_preview(model, dataset, control.preview_indices, epoch, step, device))
                    last_preview = time.perf_counter()
                if budget_s and time.perf_counter() - t0 > budget_s:
                    break
            out_of_time = bool(budget_s) and time.perf_counter() - t0 > budget_s
            last_epoch = out_of_time or (not budget_s and epoch == cfg.epochs - 1)
            stop_early = False
            if (epoch + 1) % cfg.val_every == 0 or last_epoch:
                result = confusion_on(model, images, masks, val_idx, 2 * cfg.batch_size, dist).compute()
                miou = result["miou"]
                improved = not math.isnan(miou) and miou > best
                if improved:
                    best, stale = miou, 0
                else:
                    stale += 1
                    if cfg.schedule == "plateau" and stale % 3 == 0:
                        plateau_factor *= 0.5
                yield emit(
                    ev.Validation(
                        epoch, step, result["iou"], miou, result["pixel_accuracy"], result["confusion"], best
                    )
                )
                if improved:
                    ck = checkpoint("best", epoch, miou)
                    if ck:
                        yield emit(ck)
                stop_early = cfg.patience > 0 and stale >= cfg.patience
                if control.preview_indices:
                    control._preview_now.clear()
                    yield emit(_preview(model, dataset, control.preview_indices, epoch, step, device))
                    last_preview = time.perf_counter()
            if (epoch + 1) % cfg.checkpoint_every == 0 or last_epoch or stop_early:
                ck = checkpoint("last", epoch, None)
                if ck:
                    yield emit(ck)
            if stop_early:
                reason = "early stopping"
                break
            if out_of_time:
                reason = "time budget"
                break
    except FloatingPointError as exc:
        yield emit(
            ev.Failed(
                f"{exc}; training stopped. Try a lower --lr. The last good checkpoint is kept.",
                epoch,
                step,
                last_good(),
            )
        )
        return
    except torch.cuda.OutOfMemoryError:
        yield emit(ev.Failed(
            f"CUDA ran out of memory with batch size {cfg.batch_size}; try --batch-size {max(1, cfg.batch_size // 2)}",
            epoch, step, last_good(),
        ))  # fmt: skip
        return
    finally:
        if runs is not None:
            runs.close()  # reopened in append mode for the final event below
    seconds = time.perf_counter() - t0
    best_path = str(runs.best) if runs is not None and runs.best.exists() else None
    finished = ev.Finished(epoch, step, best, best_path, seconds, reason)
    if runs is not None:
        runs.write_summary(
            {
                "best_miou": best,
                "epochs": epoch + 1,
                "steps": step,
                "seconds": seconds,
                "reason": reason,
                "best_checkpoint": best_path,
            }
        )
    yield emit(finished)
    if runs is not None:
        runs.close()


def _preview(model, dataset: Dataset, indices: list[int], epoch: int, step: int, device) -> ev.Preview:
    idx = [i for i in indices if 0 <= i < len(dataset)]
    out = predict_arrays(model, dataset.images[idx], device=device, with_entropy=True)
    model.train()
    return ev.Preview(epoch, step, idx, out["masks"], out["entropy"])


__all__ = ["TrainControl", "fit"]
