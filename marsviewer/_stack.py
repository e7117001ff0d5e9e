"""A stack of frames that napari and the session index like an (N, H, W) array while
only the frames looked at are read, and only the frames written are held in memory.

A converted dataset of thousands of 1024x1024 frames is tens of GB: its masks cannot be
copied into an array for napari to paint into. :class:`FrameStack` reads a frame from its
``base`` (a zarr array; rows beyond it, the unlabelled images, are all 0) when it is
indexed, keeps a few recent ones, and keeps every frame written to (a paint stroke, a
saved correction applied) in a dict. The same class holds predictions and overlays of
such a dataset (no base: all 0 until a frame is written).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from trainer.classes import NUM_CLASSES

CACHE_FRAMES = 8
MATERIALISE_BYTES = 256 << 20  # np.asarray of a whole stack beyond this is refused


class FrameStack:
    """(N, H, W) frames of ``dtype``: row ``i`` is the written frame if any, else ``base[i]``
    for ``i < len(base)``, else zeros. ``sizes`` (N, 2): each frame's own size inside
    the padded H x W (the dataset's frames may differ in size)."""

    def __init__(self, shape, dtype=np.uint8, base=None, sizes=None, class_pixels=None, keep=None) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.keep = keep  # at most this many written frames, the oldest dropped (None: all)
        self.dtype = np.dtype(dtype)
        self.base = base
        self.n_base = 0 if base is None else int(base.shape[0])
        self.sizes = (
            np.tile(np.array(self.shape[1:], np.int64), (self.shape[0], 1))
            if sizes is None
            else np.asarray(sizes, np.int64)
        )
        self.written: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        k = (
            np.shape(class_pixels)[1]
            if class_pixels is not None and np.ndim(class_pixels) == 2
            else NUM_CLASSES
        )
        self._pixels = np.zeros((self.shape[0], k), np.int64)
        if class_pixels is not None:
            self._pixels[: len(class_pixels)] = class_pixels
        self._dirty: set[int] = set()

    # -- what numpy and napari ask of an array
    ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def held_bytes(self) -> int:
        """What this stack holds in memory now (written frames and the read cache)."""
        return sum(a.nbytes for a in self.written.values()) + sum(a.nbytes for a in self._cache.values())

    def __array__(self, dtype=None, copy=None):
        if self.nbytes > MATERIALISE_BYTES:
            raise MemoryError(
                f"a stack of {self.shape[0]} frames ({self.nbytes / 1e9:.1f} GB) is read one frame at a time"
            )
        out = (
            np.stack([self.frame(i) for i in range(len(self))])
            if len(self)
            else np.zeros(self.shape, self.dtype)
        )
        return out if dtype is None else out.astype(dtype)

    # -- one frame
    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (the written array itself when written: writes to it show)."""
        i = self._row(i)
        if i in self.written:
            return self.written[i]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        if i < self.n_base:
            data = np.asarray(self.base[i], dtype=self.dtype)
        else:
            data = np.zeros(self.shape[1:], self.dtype)
        self._cache[i] = data
        while len(self._cache) > CACHE_FRAMES:
            self._cache.popitem(last=False)
        return data

    def _view(self, i) -> np.ndarray:
        """What ``stack[i]`` gives: the written frame itself (writes to it show, as in an
        array), else a copy of the frame read (writing to it changes nothing here: an
        edit goes through ``stack[i] = ...``)."""
        i = self._row(i)
        return self.written[i] if i in self.written else self.frame(i).copy()

    def is_written(self, i: int) -> bool:
        """Whether frame ``i`` holds something written (else it reads as its base)."""
        return self._row(i) in self.written

    def _held(self, i: int) -> np.ndarray:
        """Frame ``i`` as a writable array of its own, kept from now on."""
        i = self._row(i)
        if i not in self.written:
            self.written[i] = np.array(self.frame(i), copy=True)
            self._cache.pop(i, None)
        else:  # the most recently written last
            self.written[i] = self.written.pop(i)
        self._dirty.add(i)
        if self.keep is not None:
            while len(self.written) > self.keep:
                self.forget(next(iter(self.written)))
        return self.written[i]

    def _row(self, i) -> int:
        i = int(i)
        n = self.shape[0]
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range 0..{n - 1}")
        return i % n

    def rebase(self, base, changed=()) -> None:
        """Read unwritten frames from ``base`` from now on; ``changed``: the rows whose
        frame differs from the old base's (their class counts are redone)."""
        self.base, self.n_base = base, int(base.shape[0])
        self._cache.clear()
        self._dirty.update(int(i) for i in changed)

    def forget(self, i: int) -> None:
        """Drop what was written to frame ``i``: it reads from the base again."""
        i = self._row(i)
        self.written.pop(i, None)
        self._cache.pop(i, None)  # the base may have changed under it (a saved correction)
        self._dirty.add(i)

    def own_size(self, i: int, mask: np.ndarray) -> np.ndarray:
        """``mask`` (H, W) cut to frame ``i``'s own size."""
        h, w = self.sizes[i]
        return np.asarray(mask)[:h, :w]

    def padded(self, i: int, mask: np.ndarray) -> np.ndarray:
        """A mask of frame ``i``'s own size placed in an (H, W) frame of zeros."""
        out = np.zeros(self.shape[1:], self.dtype)
        h, w = np.shape(mask)
        out[:h, :w] = mask
        return out

    # -- indexing
    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            return self._view(first)[rest] if rest else self._view(first)
        if isinstance(first, np.ndarray) and first.ndim == 1 and len(key) == 3 and first.dtype != bool:
            return self._fancy_get(key)
        rows = np.arange(self.shape[0])[first]
        if np.ndim(rows) == 0:
            return self.frame(int(rows))[rest]
        stacked = (
            np.stack([self.frame(r) for r in rows])
            if len(rows)
            else np.zeros((0, *self.shape[1:]), self.dtype)
        )
        return stacked[(slice(None), *rest)] if rest else stacked

    def _fancy_get(self, key) -> np.ndarray:
        rows, ys, xs = (np.asarray(k) for k in key)
        out = np.zeros(rows.shape, self.dtype)
        for r in np.unique(rows):
            sel = rows == r
            out[sel] = self.frame(r)[ys[sel], xs[sel]]
        return out

    def __setitem__(self, key, value) -> None:
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, (int, np.integer)):
            self._held(first)[rest if rest else Ellipsis] = value
            return
        if isinstance(first, np.ndarray) and first.ndim == 1 and len(key) == 3 and first.dtype != bool:
            rows, ys, xs = (np.asarray(k) for k in key)
            value = np.broadcast_to(np.asarray(value, self.dtype), rows.shape)
            for r in np.unique(rows):
                sel = rows == r
                self._held(r)[ys[sel], xs[sel]] = value[sel]
            return
        rows = np.arange(self.shape[0])[first]
        value = np.asarray(value, self.dtype)
        for k, r in enumerate(np.atleast_1d(rows)):
            v = value[k] if value.ndim == 3 else value
            self._held(r)[rest if rest else Ellipsis] = v

    # -- class counts of every frame, kept up to date as frames are written
    @property
    def class_pixels(self) -> np.ndarray:
        for i in self._dirty:
            data = self.written.get(i)
            if data is None:
                data = self.frame(i)
            h, w = self.sizes[i]
            k = self._pixels.shape[1]
            self._pixels[i] = np.bincount(data[:h, :w].ravel(), minlength=k)[:k]
        self._dirty.clear()
        return self._pixels


class CorrectedFrames:
    """The base of a dataset's masks stack with its saved corrections: row ``i`` is the
    saved mask (padded to the frame) when the store has one, else the stored mask, else
    (an unlabelled frame) zeros. Nothing is held: a frame is read when asked for."""

    def __init__(self, masks, store, shape) -> None:
        self.masks, self.store = masks, store
        self.shape = tuple(shape)

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        saved = self.store.state(i)[0]
        out = np.zeros(self.shape[1:], np.uint8)
        if saved is not None:
            out[: saved.shape[0], : saved.shape[1]] = saved
        elif self.masks is not None and i < self.masks.shape[0]:
            out[:] = np.asarray(self.masks[i])
        return out


def is_stack(array) -> bool:
    return isinstance(array, FrameStack)


KEEP_DERIVED = 32  # frames of predictions and overlays a stack keeps (the latest written)


def blank_like(array, dtype=np.uint8):
    """Zeros shaped like ``array``: an array in memory, or for a stack an empty stack that
    keeps the KEEP_DERIVED frames written last (predictions and overlays are redone when
    a frame is shown again; memory stays bounded however long the session)."""
    if is_stack(array):
        return FrameStack(array.shape, dtype, sizes=array.sizes, keep=KEEP_DERIVED)
    return np.zeros(np.shape(array), dtype)


def overlay_like(array, like):
    """An overlay shaped like the masks ``like``: the one given if it fits, else a new zero one."""
    if array is None or array.shape != like.shape or is_stack(array) != is_stack(like):
        return blank_like(like)
    return array
