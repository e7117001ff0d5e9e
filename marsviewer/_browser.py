"""Qt-free state of the dataset browser: which image is shown, the class filter, statistics.

The widget only forwards user actions here and redraws on the signals, so this is where
browsing logic lives and where tests exercise it without a viewer.
"""

from __future__ import annotations

import numpy as np
from psygnal import Signal

from trainer.classes import NUM_CLASSES
from trainer.stats import DatasetStats, class_pixel_counts, class_presence, mask_stats


class DatasetBrowser:
    """The dataset being browsed and where the user is in it.

    Signals
    -------
    dataset_changed()
        A new dataset (or none) is loaded.
    index_changed(int)
        The current image changed.
    filter_changed(object)
        The class filter changed (a class id, or None for all images).
    """

    dataset_changed = Signal()
    index_changed = Signal(int)
    filter_changed = Signal(object)

    def __init__(self) -> None:
        self.masks: np.ndarray | None = None
        self.names: list[str] = []
        self.source = ""
        self.n_test = 0
        self.stats: DatasetStats | None = None
        self.presence = np.zeros((0, NUM_CLASSES), bool)
        self.index = 0
        self.class_filter: int | None = None

    # -- loading ---------------------------------------------------------------
    def set_dataset(self, masks: np.ndarray, names=None, source: str = "", n_test: int = 0) -> None:
        masks = np.asarray(masks)
        self.masks = masks
        self.names = list(names) if names else [str(i) for i in range(len(masks))]
        self.source = source
        self.n_test = n_test
        self.stats = mask_stats(masks)
        self.presence = class_presence(masks)
        self.index = 0
        self.class_filter = None
        self.dataset_changed.emit()
        self.index_changed.emit(0)

    def clear(self) -> None:
        """No dataset any more (its masks layer was removed)."""
        self.masks, self.stats, self.names, self.n_test = None, None, [], 0
        self.presence = np.zeros((0, NUM_CLASSES), bool)
        self.index = 0
        self.dataset_changed.emit()

    def refresh_stats(self) -> None:
        """Recompute statistics after masks were edited in place."""
        if self.masks is not None:
            self.stats = mask_stats(self.masks)
            self.presence = class_presence(self.masks)
            self.dataset_changed.emit()

    @property
    def loaded(self) -> bool:
        return self.masks is not None

    def __len__(self) -> int:
        return 0 if self.masks is None else len(self.masks)

    # -- browsing --------------------------------------------------------------
    def set_index(self, index: int) -> None:
        if not self.loaded:
            return
        index = int(np.clip(index, 0, len(self) - 1))
        if index != self.index:
            self.index = index
            self.index_changed.emit(index)

    def set_filter(self, class_id: int | None) -> None:
        self.class_filter = class_id
        self.filter_changed.emit(class_id)
        matching = self.matching_indices()
        if len(matching) and self.index not in set(matching.tolist()):
            self.step(+1)

    def matching_indices(self) -> np.ndarray:
        """Indices of the images the filter lets through, in order."""
        if self.class_filter is None:
            return np.arange(len(self))
        return np.flatnonzero(self.presence[:, self.class_filter])

    def step(self, direction: int) -> None:
        """Move to the next (+1) or previous (-1) image that passes the filter, wrapping around."""
        matching = self.matching_indices()
        if not len(matching):
            return
        if direction > 0:
            pos = np.searchsorted(matching, self.index, side="right")
            target = matching[pos % len(matching)]
        else:
            pos = np.searchsorted(matching, self.index, side="left") - 1
            target = matching[pos % len(matching)]
        self.set_index(int(target))

    # -- what the views show ---------------------------------------------------
    def composition(self, index: int | None = None) -> np.ndarray:
        """Pixel share of each class in one image (defaults to the current one)."""
        if not self.loaded:
            return np.zeros(NUM_CLASSES)
        counts = class_pixel_counts(np.asarray(self.masks[self.index if index is None else index]))
        return counts / max(counts.sum(), 1)

    def visit_group(self, members) -> None:
        """Step through a group of images: from a member to the next one, else to the first."""
        members = sorted(int(i) for i in members)
        if not members:
            return
        later = [i for i in members if i > self.index] if self.index in members else []
        self.set_index(later[0] if later else members[0])

    def group_of(self, index: int) -> tuple[int, ...] | None:
        if self.stats is None:
            return None
        for g in self.stats.duplicate_mask_groups:
            if index in g:
                return g
        return None
