"""Between the epochs of a run: validation, checkpoints and the decision to go on. A
mixin of the engine's ``_Trainer`` (like ``epoch_steps.py``, ``previews.py`` and
``epoch_corrections.py``), kept apart so that each module reads in one sitting; it uses
the trainer's state (``cfg``, ``state``, ``model``, ``runs`` ...)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import torch

from . import events as ev
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .cuda_graph import plain_state_dict
from .device import TrainingFailure
from .inference import confusion_on, predict_batch
from .tiling import frames_confusion

STOPPED = "stopped"  # what end_of_epoch returns after a stop request: Stopped was said
PROGRESS_EVERY_S = 1.0  # a validation of frames from disk says how far it is this often


def describe_failure(exc: BaseException, cfg: TrainConfig) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return (
            f"CUDA ran out of memory with batch size {cfg.batch_size}; "
            f"try --batch-size {max(1, cfg.batch_size // 2)}"
        )
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


class EpochEnd:
    """Validate, checkpoint and preview; say when the run ends; take in corrections."""

    def last_good(self) -> str | None:
        """Every checkpoint on disk passed the finiteness check before it was written."""
        if self.runs is None:
            return None
        for path in (self.runs.last, self.runs.best):
            if path.exists():
                return str(path)
        return None

    # -- validation, checkpoints, previews
    def validate(self) -> Iterator[ev.Event]:
        """Score the validation split; returns False when a stop request ended it early
        (frames from disk are validated a frame at a time), else True."""
        cfg, st = self.cfg, self.state
        problem, cm, began = None, None, self.used()
        try:
            if self.stored is not None:  # whole frames from disk, large ones by tiles: say how far
                cm = yield from self._with_progress(
                    frames_confusion(
                        self.model,
                        self.stored,
                        self.val_idx,
                        self.device,
                        self.precision,
                        self.dist,
                        reduce=False,
                        overrides=self.crops.overrides if self.crops is not None else None,
                    )
                )
            else:
                cm = confusion_on(
                    self.model, self.images, self.masks, self.val_idx, self._val_batch(), self.dist,
                    self.precision, reduce=False,
                )  # fmt: skip
        except Exception as exc:
            if not self.peers.active:
                raise
            problem = describe_failure(exc, cfg)
        if cm is None and problem is None:  # stopped part-way (on every rank alike)
            return False
        self.peers.agree(problem)
        cm.all_reduce()
        result = cm.compute()
        self.validation_s, self.validation_timed = self.peers.latest(self.used() - began), True
        miou = result["miou"]
        improved = not math.isnan(miou) and miou > st.best
        if improved:
            st.best, st.stale = miou, 0
        else:
            st.stale += 1
            if cfg.schedule == "plateau" and st.stale % 3 == 0:
                st.plateau_factor *= 0.5
        train_loss = (self.epoch_loss / self.epoch_loss_n).item() if self.epoch_loss_n else None
        self.epoch_loss.zero_()
        self.epoch_loss_n = 0
        yield self.emit(
            ev.Validation(
                st.epoch, st.step, result["iou"], miou, result["pixel_accuracy"], result["confusion"],
                st.best, result["miou_keras"], len(self.val_idx), train_loss, self.lr, self.elapsed(),
                result["scored"], result["absent"], result["left_out"],
            )
        )  # fmt: skip
        if improved:
            yield from self.save("best", miou)
        if self.preview_due(epoch_end=True):
            yield self.emit(self.preview())
        return True

    def estimate_validation(self) -> ev.Progress | None:
        """Before a time budget's first validation, what it will take: a little of this
        process's share is validated on the budget's clock and scaled to the whole share
        (by images, or by pixels for frames from disk). Without it, a budget shorter than
        an epoch ended its training on time and then ran the final validation past the
        end (on frames from disk, minutes). A few images (a frame from disk) warm up (the
        kernels, the folded model), as many more are timed: about 5% of the share.
        Returns what to tell the user when the validation alone leaves the budget no
        room for training (one step is still taken), else None."""
        mine = np.asarray(self.val_idx)[self.dist.rank :: self.dist.world]
        if self.stored is not None:
            size, k = self.stored.sizes[mine].astype(np.float64).prod(axis=1), 1

            def run(rows):
                for _ in frames_confusion(
                    self.model, self.stored, rows, self.device, self.precision, reduce=False
                ):
                    pass

        else:
            size, b = np.ones(len(mine)), self._val_batch()
            k = min(b, -(-len(mine) // 40))  # whole frames held in memory can be large

            def run(rows):
                confusion_on(
                    self.model, self.images, self.masks, rows, b, precision=self.precision, reduce=False
                )

        parts = [part for part in (slice(0, k), slice(k, 2 * k)) if part.start < len(mine)]
        problem = None
        try:
            for part in parts:
                began = self.used()
                run(mine[part])
                took = self.used() - began
        except Exception as exc:
            if not self.peers.active:
                raise
            problem = describe_failure(exc, self.cfg)
        self.peers.agree(problem)  # every rank comes here, an empty share included
        estimate = float(took * size.sum() / size[parts[-1]].sum()) if parts else 0.0
        self.validation_s, self.validation_timed = self.peers.latest(estimate), True
        if self.used() + self.validation_s <= self.budget_s:
            return None
        return ev.Progress(
            f"the {self.budget_s:.0f} s budget leaves no room for training: validating takes "
            f"about {self.validation_s:.0f} s; one step, then the final validation"
        )

    def _with_progress(self, frames) -> Iterator[ev.Event]:
        """Run ``frames`` (yielding this process's frames done, and its share) to the end
        with a Progress event before it and then at most every PROGRESS_EVERY_S; returns
        its value, or None when a stop request ended it. Between frames it is what a step
        is: a pause holds it, and the ranks of a torchrun job agree on a stop after each
        round of frames (one a rank; a rank whose share is a frame shorter agrees once more
        at its end), so that all end it at the same frame."""
        control = self.control
        total = len(self.val_idx)  # over all processes: each validates its share
        rounds = -(-total // self.dist.world)
        yield self.emit(ev.Progress(f"validating {total} images", 0, total))
        last, agreed = time.perf_counter(), 0
        while True:
            try:
                done, _ = next(frames)
            except StopIteration as end:
                for _ in range(rounds - agreed):  # the peers' last rounds: a stop there ends all
                    if self.peers.agree(None, control.stop_requested):
                        return None
                return end.value
            if control.poll is not None:
                control.poll()
            if control.paused:
                yield from self.hold()
            agreed += 1
            if self.peers.agree(None, control.stop_requested):
                frames.close()
                return None
            if time.perf_counter() - last >= PROGRESS_EVERY_S:
                done = min(total, done * self.dist.world)
                yield self.emit(ev.Progress(f"validating: {done} of {total} images", done, total))
                last = time.perf_counter()

    def _val_batch(self) -> int:
        """Images per validation forward pass: on a CPU the batch at which prediction
        runs fastest (:func:`~trainer.inference.predict_batch`: its activations stay in
        the caches), elsewhere twice the training batch's pixels (no gradients to hold;
        whole frames held in memory can be far larger than the crops trained on)."""
        shape = self.images.shape[-2:]
        if self.device.type == "cpu":
            return predict_batch(shape)
        trained = int(np.prod(self.crops.tile)) if self.crops is not None else shape[0] * shape[1]
        return max(1, 2 * self.batch * trained // (shape[0] * shape[1]))

    def save(self, which: str, miou: float | None = None) -> Iterator[ev.Event]:
        """Write ``best`` or ``last`` after checking that every tensor is finite; a
        non-finite one raises instead, so the file on disk stays the last good one."""
        self.check_finite()
        tensors = [*self.model.state_dict().values()]
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        bad = any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)
        self.peers.agree("the weights became non-finite" if bad else None)
        if self.runs is None:
            return
        st = self.state
        path = self.runs.best if which == "best" else self.runs.last
        try:
            self._save_checkpoint(path, miou)
        except OSError as exc:
            from .outputs import why_not_written

            raise TrainingFailure(
                f"{path}: the {which} checkpoint could not be written ({why_not_written(exc)})"
            ) from None
        yield self.emit(ev.Checkpoint(st.epoch, st.step, str(path), which, miou))

    def _save_checkpoint(self, path, miou: float | None) -> None:
        st = self.state
        save_checkpoint(
            path, model=self.model, config=self.cfg, classes=self.dataset.classes,
            optimizer=plain_state_dict(self.optimizer),
            epoch=st.epoch, step=st.step, best_miou=st.best,
            miou=miou if miou is not None and not math.isnan(miou) else -1.0,
            plateau_factor=st.plateau_factor, stale=st.stale, elapsed_s=self.elapsed(),
            resume=self._resume_point(), rng_state=torch.get_rng_state(),
            train_indices=[int(i) for i in self.base_train_idx], val_indices=[int(i) for i in self.base_val_idx],
        )  # fmt: skip

    def _resume_point(self) -> dict:
        st = self.state
        if st.batch >= self.steps_per_epoch:
            return {"epoch": st.epoch + 1, "batch": 0}
        return {"epoch": st.epoch, "batch": st.batch}

    def stop(self) -> Iterator[ev.Event]:
        path = None
        for e in self.save("last"):
            path = e.path
            yield e
        yield self.emit(ev.Stopped(self.state.epoch, self.state.step, path))

    # -- the end of an epoch
    def end_of_epoch(self) -> Iterator[ev.Event]:
        """Validate, checkpoint, and decide whether to go on; returns the reason to end
        the run, or None."""
        cfg, st = self.cfg, self.state
        # Ranks' clocks differ by a little: one that stops alone would leave the others waiting.
        out_of_time = bool(self.budget_s) and self.peers.agree(None, self.out_of_time())
        last_epoch = out_of_time or (not self.budget_s and st.epoch == cfg.epochs - 1)
        stop_early = False
        if (st.epoch + 1) % cfg.val_every == 0 or last_epoch:
            if not (yield from self.validate()):  # stopped while validating: the epoch is done
                st.batch = self.steps_per_epoch
                yield from self.stop()
                return STOPPED
            stop_early = cfg.patience > 0 and st.stale >= cfg.patience
            if self.budget_s and not out_of_time:  # no room left for another epoch's validation:
                out_of_time = last_epoch = self.peers.agree(None, self.out_of_time())  # end on this one
        if out_of_time and st.batch < self.steps_per_epoch:
            st.batch = self.steps_per_epoch  # the rest of this epoch is not owed on resume
        if (st.epoch + 1) % cfg.checkpoint_every == 0 or last_epoch or stop_early:
            yield from self.save("last")
        if stop_early:
            return "early stopping"
        if out_of_time:
            return "time budget"
        if last_epoch:
            return "completed"
        st.epoch += 1
        st.batch = 0
        return None

    def finished(self, reason: str) -> ev.Finished:
        seconds = self.elapsed()
        best_path = str(self.runs.best) if self.runs is not None and self.runs.best.exists() else None
        st = self.state
        if self.runs is not None:
            self.runs.write_summary(
                {
                    "best_miou": st.best,
                    "epochs": st.epoch + 1,
                    "steps": st.step,
                    "seconds": seconds,
                    "reason": reason,
                    "best_checkpoint": best_path,
                }
            )
        return ev.Finished(st.epoch, st.step, st.best, best_path, seconds, reason, self.ending_note(reason))

    def ending_note(self, reason: str) -> str:
        """For a budget that ended the run before it could learn: how many steps it made
        and why (the CPU it got, when other programs took most of it)."""
        steps = self.state.step - self.start_step
        if reason != "time budget" or steps >= ev.LEARNING_STEPS:
            return ""
        wall = max(time.perf_counter() - self.wall0 - self.paused_s, 1e-9)
        cores = (time.process_time() - self.cpu0) / wall if self.device.type == "cpu" else None
        busy = ev.cpu_share_text(cores, torch.get_num_threads() if cores is not None else None)
        why = f" ({busy})" if busy else ""
        return (
            f"only {steps} training step{'s' if steps != 1 else ''} in the time budget{why}: too few to learn much; "
            "give more minutes" + (" or close other programs" if busy else "")
        )
