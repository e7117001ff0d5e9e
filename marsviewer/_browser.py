"""Qt-free state of the dataset browser: which image is shown, the class filter, statistics.

The widget only forwards user actions here and redraws on the signals, so this is where
browsing logic lives and where tests exercise it without a viewer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from psygnal import Signal

from trainer.classes import CLASSES, NUM_CLASSES, ClassTable
from trainer.stats import DatasetStats, class_pixel_counts, class_presence, counts_stats, mask_stats

from ._stack import is_stack

SHOW = ("labelled", "unlabelled", "all")


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
    show_changed(str)
        Which images are browsed changed: "labelled", "unlabelled" or "all".

    Rows from ``n_labelled`` on are the unlabelled images (the npz ``test_set``, a
    folder's images without masks); those given a saved label since are in
    ``pool_labelled`` and count as labelled in the statistics.
    """

    dataset_changed = Signal()
    index_changed = Signal(int)
    filter_changed = Signal(object)
    show_changed = Signal(str)

    def __init__(self) -> None:
        self.masks: np.ndarray | None = None
        self.names: list[str] = []
        self.source = ""
        self.n_test = 0
        self.stats: DatasetStats | None = None
        self.classes: ClassTable = CLASSES  # the dataset's class table
        self.presence = np.zeros((0, NUM_CLASSES), bool)
        self.index = 0
        self.class_filter: int | None = None
        self.n_labelled = 0
        self.pool_labelled: set[int] = set()
        self.show = "labelled"

    # -- loading ---------------------------------------------------------------
    def set_dataset(
        self,
        masks: np.ndarray,
        names=None,
        source: str = "",
        n_test: int = 0,
        classes: ClassTable | None = None,
    ) -> None:
        """``masks``: an array, or a :class:`~marsviewer._stack.FrameStack` of a dataset
        read from disk (statistics then come from its class table, never its frames).
        ``classes``: the dataset's class table (default: the competition's)."""
        masks = masks if is_stack(masks) else np.asarray(masks)
        self.masks = masks
        self.classes = classes if classes is not None else CLASSES
        self.names = list(names) if names else [str(i) for i in range(len(masks))]
        self.source = source
        self.n_test = n_test
        self.n_labelled = len(masks) - n_test
        self.pool_labelled = set()
        self.show = "labelled" if self.n_labelled else "unlabelled"
        self.stats = self._labelled_stats()
        self.presence = self._presence()
        self.class_filter = None
        self.index = int(self.matching_indices()[0]) if len(self.matching_indices()) else 0
        self.dataset_changed.emit()
        self.index_changed.emit(self.index)

    def clear(self) -> None:
        """No dataset any more (its masks layer was removed)."""
        self.masks, self.stats, self.names, self.n_test = None, None, [], 0
        self.n_labelled, self.pool_labelled = 0, set()
        self.classes = CLASSES
        self.presence = np.zeros((0, NUM_CLASSES), bool)
        self.index = 0
        self.dataset_changed.emit()

    def refresh_stats(self) -> None:
        """Recompute statistics after masks were edited in place."""
        if self.masks is not None:
            self.stats = self._labelled_stats()
            self.presence = self._presence()
            self.dataset_changed.emit()

    def _presence(self) -> np.ndarray:
        if is_stack(self.masks):
            return self.masks.class_pixels > 0
        return class_presence(self.masks, len(self.classes))

    def _labelled_stats(self) -> DatasetStats:
        """Statistics of the labelled rows, duplicate groups given as row indices (not
        looked for in a dataset read from disk: that would read every mask)."""
        rows = self.labelled_rows()
        if is_stack(self.masks):
            pixels = self.masks.class_pixels[rows]
            return counts_stats((pixels > 0).sum(axis=0), pixels.sum(axis=0), len(rows), classes=self.classes)
        stats = mask_stats(np.asarray(self.masks)[rows], self.classes)
        groups = tuple(tuple(int(rows[i]) for i in g) for g in stats.duplicate_mask_groups)
        return dataclasses.replace(stats, duplicate_mask_groups=groups)

    def set_pool_labelled(self, rows) -> None:
        """These unlabelled images now have a saved label (statistics follow)."""
        self.pool_labelled = set(int(i) for i in rows)
        self.refresh_stats()

    def own_name(self, row: int) -> str:
        """Image ``row``'s file name (a folder's, a zarr dataset's), or "" where its name is
        only its number (an npz, the synthetic sample)."""
        name = self.names[row] if 0 <= row < len(self.names) else ""
        number = row
        if row >= self.n_labelled:
            name, number = name.removeprefix("unlabelled "), row - self.n_labelled
        return "" if name in ("", str(number), str(row)) else name

    def image_title(self, row: int) -> str:
        """ "Image 88", with its file name where it has one of its own ("Image 3 (site_a/f3)")."""
        own = self.own_name(row)
        return f"Image {row}" + (f" ({own})" if own else "")

    def count_text(self) -> str:
        """Beside the image number: the last number, and how many images the show choice
        and the class filter let through when that is not all of them."""
        n = len(self)
        shown = len(self.matching_indices())
        return f"of {n - 1}" + (f" · {shown} shown" if shown != n else "")

    def labelled_rows(self) -> np.ndarray:
        """The labelled images and the unlabelled ones labelled since."""
        return np.concatenate(
            [np.arange(self.n_labelled), np.array(sorted(self.pool_labelled), dtype=np.int64)]
        )

    def is_unlabelled(self, index: int | None = None) -> bool:
        i = self.index if index is None else index
        return i >= self.n_labelled and i not in self.pool_labelled

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

    def set_show(self, show: str) -> None:
        """Browse the "labelled" images, the "unlabelled" ones or "all"."""
        if show not in SHOW:
            raise ValueError(f"show must be one of {SHOW}, got {show!r}")
        self.show = show
        self.show_changed.emit(show)
        matching = self.matching_indices()
        if len(matching) and self.index not in set(matching.tolist()):
            self.step(+1)

    def matching_indices(self) -> np.ndarray:
        """Indices of the images the show choice and the class filter let through, in order."""
        rows = np.arange(len(self))
        if self.show == "labelled":
            rows = self.labelled_rows()
        elif self.show == "unlabelled":
            rows = np.array(
                [i for i in range(self.n_labelled, len(self)) if i not in self.pool_labelled], np.int64
            )
        if self.class_filter is not None:
            rows = rows[self.presence[rows, self.class_filter]]
        return np.sort(rows)

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
            return np.zeros(len(self.classes))
        i = self.index if index is None else index
        if is_stack(self.masks):  # counted inside the frame's own size, kept up to date
            counts = self.masks.class_pixels[i]
        else:
            counts = class_pixel_counts(np.asarray(self.masks[i]), n_classes=len(self.classes))
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

    def pool_balance(self, masks: np.ndarray) -> str:
        """A line: the class shares ``masks`` (a prediction of every row) gives the unlabelled
        images, beside the labelled terrain's ("" without unlabelled images)."""
        pool = [i for i in range(self.n_labelled, len(masks)) if i not in self.pool_labelled]
        if not pool or self.stats is None:
            return ""
        predicted = class_pixel_counts(masks[pool], n_classes=len(self.classes))
        labelled = np.array([c.pixels for c in self.stats.classes], float)
        parts = [
            f"{c.name} {100 * predicted[c.id] / max(predicted[1:].sum(), 1):.0f}% "
            f"({100 * labelled[c.id] / max(labelled[1:].sum(), 1):.0f}%)"
            for c in self.classes[1:]
        ]
        return (
            f"\nPredicted for the {len(pool)} unlabelled images (labelled terrain in brackets): "
            + ", ".join(parts)
        )
