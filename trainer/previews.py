"""Previews of the images the viewer shows, predicted with the current weights while a
run trains: when asked for, at an interval, or at an epoch's end. A mixin of the
engine's ``_Trainer``; it uses the trainer's state (``control``, ``model``, ``images``,
``stored`` ...)."""

from __future__ import annotations

import time

import numpy as np
import torch

from . import events as ev
from .inference import predict_arrays
from .tiling import predict_any


class Previews:
    """Say when a preview is due, and make it."""

    def preview_due(self, epoch_end: bool = False) -> bool:
        """Whether to preview now (takes a pending request): when one was asked for, when
        the run's preview interval has passed, and, in a run without an interval, at an
        epoch's end (new weights). With an interval, epoch ends keep it too: on a small
        dataset epochs take a second or two, and every preview costs the viewer a repaint
        taken from the training on the same cores."""
        control = self.control
        if not control.preview_indices:
            return False
        asked = control.take_preview_request()
        if control.preview_every_s is None:
            return asked or epoch_end
        return asked or time.perf_counter() - self.last_preview >= control.preview_every_s

    def preview(self) -> ev.Preview:
        if self.stored is not None:
            return self._preview_stored()
        # Any row the trainer holds: the labelled images, then the unlabelled ones.
        idx = [i for i in self.control.preview_indices if 0 <= i < len(self.images)]
        out = predict_arrays(
            self.model,
            self.images[torch.as_tensor(idx, dtype=torch.long, device=self.images.device)],
            device=self.device,
            with_entropy=True,
            precision=self.precision,
        )
        self.last_preview = time.perf_counter()
        return ev.Preview(self.state.epoch, self.state.step, idx, out["masks"], out["entropy"])

    def _preview_stored(self) -> ev.Preview:
        """Previews of frames read from disk, predicted at their own size (padded to the
        store's frame size so they stack like the frames napari shows)."""
        idx = [i for i in self.control.preview_indices if 0 <= i < len(self.stored.names)]
        h, w = self.stored.frame_shape
        masks = np.zeros((len(idx), h, w), np.uint8)
        entropy = np.zeros((len(idx), h, w), np.float16)
        for k, i in enumerate(idx):
            probs = predict_any(self.model, self.stored.image(i), self.device, self.precision)
            fh, fw = probs.shape[1:]
            masks[k, :fh, :fw] = probs.argmax(0)
            entropy[k, :fh, :fw] = -(probs * np.log(np.clip(probs, 1e-8, None))).sum(0)
        self.last_preview = time.perf_counter()
        return ev.Preview(self.state.epoch, self.state.step, idx, masks, entropy)
