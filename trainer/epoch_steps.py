"""The steps of one epoch: the draws, one optimisation step, step events and previews,
and holding while the control is paused. A mixin of the engine's ``_Trainer`` (like
``epoch_end.py``); it uses the trainer's state (``cfg``, ``state``, ``model``, ``crops`` ...)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch.profiler import record_function as phase  # names a step's parts in a profile (7 us each)

from . import events as ev
from .augment import augment_batch
from .config import TrainConfig
from .epoch_end import describe_failure
from .inference import to_input


def _lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine":
        return warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    return warm


class EpochSteps:
    """Draw, step and report; hold while paused."""

    def _step_seed(self, batch: int) -> int:
        """The seed of a step's augmentation: from (seed, epoch, batch, rank), so that a
        resumed run draws what the uninterrupted run drew."""
        return ((self.cfg.seed * 1_000_003 + self.state.epoch) * 100_003 + batch) * 64 + self.dist.rank

    def _step_generator(self, batch: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self._step_seed(batch))

    def _epoch_draws(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.state.epoch)
        draws = torch.multinomial(
            self.sample_weights, self.steps_per_epoch * self.per_step, replacement=True, generator=g
        )
        return torch.as_tensor(self.train_idx)[draws[self.dist.rank :: self.dist.world]].to(self.device)

    def _progress(self, clock: float | None = None) -> float:
        """How far the run is, in [0, 1]: by steps, or by the budget's ``clock`` (default
        now) with the final validation included."""
        if self.budget_s:
            return ((self.used() if clock is None else clock) + self.validation_s) / self.budget_s
        return self.state.step / max(self.total_steps, 1)

    def train_step(self, images_u8: torch.Tensor, masks_u8: torch.Tensor) -> torch.Tensor:
        """One optimisation step. Forward and loss run under a guard so that, under
        torchrun, a rank that fails there tells the others before anyone enters the
        gradient all-reduce of ``backward``."""
        st = self.state
        problem, loss = None, None
        try:
            self.set_step_lr()
            loss = self.forward_loss(images_u8, masks_u8, self._step_generator(st.batch))
        except Exception as exc:
            if not self.peers.active:
                raise
            problem = describe_failure(exc, self.cfg)
        self.peers.agree(problem)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_update(loss)
        st.step += 1
        st.batch += 1
        return loss.detach()

    def set_step_lr(self) -> None:
        """This step's learning rate into the optimiser (into its tensor when a CUDA graph
        reads it from there)."""
        st = self.state
        self.lr = (
            self.cfg.lr * st.plateau_factor * _lr_factor(self.cfg, st.step, self._progress(self.step_clock))
        )
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(self.lr)
            else:
                group["lr"] = self.lr

    def forward_loss(
        self, images_u8: torch.Tensor, masks_u8: torch.Tensor, generator: torch.Generator, cache: bool = True
    ) -> torch.Tensor:
        """Augmentation, forward and loss of one batch (``cache``: autocast's cast cache,
        which a CUDA graph's capture must go without)."""
        with phase("step/augment"):
            x, y = to_input(images_u8, self.device), masks_u8  # the loss takes uint8 targets
            if self.cfg.augment:
                x, y = augment_batch(x, y, self.cfg, generator)
        with phase("step/forward"), self.precision.autocast(self.device, cache):
            logits = self.train_model(x)
        with phase("step/loss"):
            return self.criterion(logits, y)

    def backward_update(self, loss: torch.Tensor) -> None:
        """Backward, the non-finite flag (kept on the device: nothing is read back) and
        the optimiser's step."""
        with phase("step/backward"):
            loss.backward()
        with phase("step/finite"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            self.nonfinite |= ~torch.isfinite(grad_norm) | ~torch.isfinite(loss.detach())
        with phase("step/optimizer"):
            self.optimizer.step()

    def check_finite(self, mean_loss: float | None = None) -> None:
        """Fail (on every rank alike) if the loss or a gradient stopped being finite."""
        problem = None
        if mean_loss is not None and not math.isfinite(mean_loss):
            problem = f"the loss became {mean_loss} at step {self.state.step}"
        elif bool(self.nonfinite):
            problem = f"a gradient became non-finite by step {self.state.step} (the loss was still finite)"
        self.peers.agree(problem)

    def run_epoch(self) -> Iterator[ev.Event]:
        """The steps of the current epoch from ``state.batch`` on, with step events and
        previews. Returns True when a stop was requested (after yielding Stopped)."""
        st = self.state
        if self.crops is None:
            mine = self._epoch_draws()
        else:
            crops = self.crops.batches(st.epoch, st.batch, self.steps_per_epoch)
        try:
            return (yield from self._steps(mine if self.crops is None else crops))
        finally:
            if self.crops is not None:
                crops.close()

    def _steps(self, source) -> Iterator[ev.Event]:
        cfg, st, control = self.cfg, self.state, self.control
        self.train_model.train()
        loss_sum, loss_n, t_log, n_log = torch.zeros((), device=self.device), 0, time.perf_counter(), 0
        cpu_log = time.process_time()
        previous = None  # the last step's start on the budget's clock, in this epoch
        while st.batch < self.steps_per_epoch:
            if control.poll is not None:
                control.poll()
            if control.paused:
                yield from self.hold()
            stop, self.step_clock = self.peers.stop_and_clock(control.stop_requested, self.used())
            if previous is not None:  # a budget leaves room for one more step like the last
                self.step_s = self.step_clock - previous
            previous = self.step_clock
            if stop:  # the learning rate follows the agreed clock: the same on every rank
                yield from self.stop()
                return True
            k = st.batch
            if self.graphed is not None:  # gathers its batch itself, inside the graph
                loss = self.graphed.step(source[k * cfg.batch_size : (k + 1) * cfg.batch_size])
            else:
                with phase("step/batch"):  # gathered on the device, or crops read from disk
                    if self.crops is None:
                        idx = source[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                        images, masks = self.images[idx], self.masks[idx]
                    else:
                        images, masks = (torch.from_numpy(a).to(self.device) for a in next(source))
                loss = self.train_step(images, masks)
            if self.graphed is not None and self.graphed.notice:  # the capture failed
                yield self.emit(ev.Progress(self.graphed.notice))
                self.graphed.notice = None
            loss_sum += loss
            loss_n += 1
            n_log += self.batch * self.dist.world  # every batch is full (crops too)
            if st.step % cfg.log_every == 0 or st.batch == self.steps_per_epoch:
                mean_loss = (loss_sum / loss_n).item()
                self.check_finite(mean_loss)
                self.epoch_loss += loss_sum
                self.epoch_loss_n += loss_n
                now = time.perf_counter()
                rate = n_log / max(now - t_log, 1e-9)
                done = min(self._progress(), 1.0)
                eta = (now - self.t0) * (1 - done) / done if done > 0 else None
                cpu_now = time.process_time()
                cores = (cpu_now - cpu_log) / max(now - t_log, 1e-9) if self.device.type == "cpu" else None
                threads = torch.get_num_threads() if cores is not None else None
                yield self.emit(
                    ev.Step(st.epoch, st.step, mean_loss, self.lr, rate, done, eta, cores, threads)
                )
                loss_sum.zero_()
                loss_n, t_log, n_log, cpu_log = 0, now, 0, cpu_now
            if self.preview_due():
                yield self.emit(self.preview())
            if self.budget_s and self.peers.agree(None, self.out_of_time()):  # every rank alike
                break
        return False

    def hold(self) -> Iterator[ev.Event]:
        """Wait between steps while the control is paused, answering preview requests."""
        control, t = self.control, time.perf_counter()
        while control.paused:
            if control.preview_indices and control.take_preview_request():
                yield self.emit(self.preview())
            time.sleep(0.02)
            if control.poll is not None:
                control.poll()
        self.paused_s += time.perf_counter() - t
