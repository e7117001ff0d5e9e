"""The corrections a run takes in before each epoch: edited masks replace the originals,
newly labelled images join training, excluded images leave both splits. A mixin of the
engine's ``_Trainer``; it uses the trainer's state (``corrections``, ``masks``,
``train_idx`` ...)."""

from __future__ import annotations

import numpy as np
import torch

from . import events as ev
from .dataset import DatasetError
from .stats import class_presence


class EpochCorrections:
    """Read the corrections store (rank 0's reading under torchrun) and apply it."""

    def reload_corrections(self) -> ev.DataUpdate | None:
        """Apply the store's current state; returns a DataUpdate event when it changed.
        Excluded images leave both splits: they neither train nor decide the best checkpoint."""
        if self.corrections is None:
            return None
        # Under torchrun rank 0 reads the store and every rank takes its reading: a
        # correction saved between two ranks' reads would train them on different rows.
        state = None
        if self.dist.is_main:
            version = self.corrections.version()
            state = (
                (version, None, None)
                if version == self.seen_version
                else (version, *self.corrections.snapshot())
            )
        version, edited, excluded = self.peers.share(state)
        if version == self.seen_version:
            return None
        self.seen_version = version
        n_rows = len(self.base_masks) if self.stored is None else len(self.stored.names)
        edited = {i: m for i, m in edited.items() if i < n_rows}
        k = len(self.classes)
        if self.stored is None:
            effective = self.base_masks.copy()
            for i, m in edited.items():
                effective[i] = m
            self.masks.copy_(torch.from_numpy(effective))
            self.presence = class_presence(effective, k)
            pixels = None
            if self.crops is not None:  # crops drawn from memory: by the corrected classes
                pixels = np.stack([np.bincount(m.ravel(), minlength=k)[:k] for m in effective])
        else:  # frames on disk: corrected masks ride along with the crops, the rest stay there
            pixels = np.zeros((n_rows, k), np.int64)
            pixels[: self.n_labelled] = self.stored.class_pixels
            for i, m in edited.items():
                pixels[i] = np.bincount(m.ravel(), minlength=k)[:k]
            self.presence = pixels > 0
        drop = np.fromiter(excluded, dtype=np.int64, count=len(excluded))
        new_labels = np.array(sorted(i for i in edited if i >= self.n_labelled), np.int64)
        self.train_idx = np.setdiff1d(np.union1d(self.base_train_idx, new_labels), drop)
        self.val_idx = np.setdiff1d(self.base_val_idx, drop)
        if len(self.train_idx) == 0:
            raise DatasetError("every training image is excluded")
        if self.crops is not None:
            self.crops.overrides = dict(edited)
            self.crops.set_rows(self.train_idx, pixels)
        self.sample_weights = self._sample_weights()
        corrected = sum(1 for i in edited if i < self.n_labelled)
        absent = self.model.absent() if self.leave_out_absent() else None
        return ev.DataUpdate(
            self.state.epoch, corrected, len(excluded), len(self.train_idx), len(new_labels), absent
        )
