"""Training on random crops of frames at their native resolution, read by background
threads from a zarr dataset on disk (or from memory, for comparison and small data).

* Which crop: half the crops are class-aware (a foreground class drawn uniformly among
  those the training frames hold, a frame holding it, a 64x64 cell of that frame holding
  it weighted by its pixels there, a crop around a point of that cell), half uniform
  (a frame, a position). Rare classes are seen at least 1/8 of the time each.
* Every draw of batch k of epoch e on rank r comes from a generator seeded with
  (seed, e, k, r): runs repeat, a resumed run draws what the uninterrupted one drew, and
  under torchrun each rank reads its own crops.
* Memory: ``prefetch`` batches in flight, whatever the dataset's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .classes import NUM_CLASSES
from .formats.zarr_dataset import CELL
from .formats.zarr_writer import cell_counts
from .losses import IGNORE_INDEX

CLASS_AWARE_SHARE = 0.5
DISK_TILE = 256  # crop size for datasets trained from disk when --tile is not given


def crop_source(cfg, stored, images, masks, n_labelled: int, rows, rank: int, n_classes: int = NUM_CLASSES):
    """(the run's CropSource or None, what it trains on in words): crops when ``tile`` is
    set, the dataset stays on disk (``stored``) or its frames held in memory are larger
    than :data:`DISK_TILE` on a side (a step of 32 whole 500x560 frames would hold some
    10 GB), else whole images from memory.
    ``images`` is the trainer's image tensor, ``masks`` its masks as an array."""
    large = stored is None and not cfg.tile and max(masks.shape[1:]) > DISK_TILE
    if not cfg.tile and stored is None and not large:
        return None, "whole images held in memory"
    sizes = stored.sizes if stored is not None else np.array([masks.shape[1:]])
    tile = (cfg.tile, cfg.tile) if cfg.tile else disk_tile(sizes, 2**cfg.depth)
    size = f"{tile[0]}x{tile[1]}"
    batch = crop_batch(cfg, tile)
    per_step = f"{batch} a step" + (
        "" if cfg.crop_batch else f", the pixels of {cfg.batch_size} images of 64x128"
    )
    if stored is not None:
        frames = stored
        mode = (
            f"{size} crops ({per_step}) read from disk by {cfg.data_workers} threads "
            f"({len(stored.names)} frames, {stored.nbytes / 1e6:,.0f} MB)"
        )
    else:
        frames = MemoryFrames(masks, images.cpu().numpy(), n_labelled, n_classes)
        mode = f"{size} crops ({per_step}) of images held in memory" + (
            f" (frames larger than {DISK_TILE} train by crops unless --tile says otherwise)" if large else ""
        )
    return CropSource(frames, rows, tile, batch, cfg.seed, rank, cfg.data_workers), mode


SMALL_IMAGE_PIXELS = 64 * 128  # the competition's images, which batch_size counts


def crop_batch(cfg, tile: tuple[int, int]) -> int:
    """Crops a step: ``crop_batch``, or as many pixels as ``batch_size`` images of 64x128.
    A step's pixels set its memory and its speed per pixel: 32 crops of 256x256 (eight
    times the pixels of 32 small images) held 2.3 GB training on a hundred 512x560
    frames and ran at 0.75 of the small images' pixel rate; 4 such crops held 0.8 GB and
    ran at about 0.9 of it (bench/crop_rate.py)."""
    if cfg.crop_batch:
        return int(cfg.crop_batch)
    return max(1, round(cfg.batch_size * SMALL_IMAGE_PIXELS / (tile[0] * tile[1])))


def disk_tile(sizes: np.ndarray, multiple: int) -> tuple[int, int]:
    """The crop of a dataset trained from disk without ``--tile``: DISK_TILE a side, or
    less where every frame is smaller (the largest frame's side, up to a multiple of the
    U-Net's ``multiple``): crops of 64x128 frames are 64x128, not frames padded to 256x256
    (eight times the pixels, seven eighths of them padding)."""
    if not len(sizes):
        return DISK_TILE, DISK_TILE
    h, w = (min(DISK_TILE, -(-int(v) // multiple) * multiple) for v in np.asarray(sizes).max(axis=0))
    return h, w


class MemoryFrames:
    """In-memory frames of one size seen as a stored dataset: rows ``n_labelled`` on are
    unlabelled (their masks, all 0, are never read: only corrections label them)."""

    def __init__(
        self, masks: np.ndarray, images: np.ndarray, n_labelled: int, n_classes: int = NUM_CLASSES
    ) -> None:
        self.images, self.masks, self.n_labelled = images, masks, n_labelled
        n, h, w = images.shape
        self.sizes = np.tile(np.array([h, w], np.int32), (n, 1))
        labelled = masks[:n_labelled]
        self.class_pixels = np.stack(
            [np.bincount(m.ravel(), minlength=n_classes)[:n_classes] for m in labelled]
        )
        self._cells = np.stack([cell_counts(m, (h, w), n_classes) for m in labelled])

    def class_cells(self) -> np.ndarray:
        return self._cells


class CropSource:
    """Batches of (images, masks) uint8 crops of ``tile`` (a side, or (height, width))
    from ``frames`` (a :class:`~trainer.formats.StoredDataset` or :class:`MemoryFrames`).
    Where a frame is smaller than the crop, the rest of the crop is image 0 and mask
    ``IGNORE_INDEX``: no loss counts it."""

    def __init__(self, frames, rows: np.ndarray, tile: int | tuple[int, int], batch: int, seed: int,
                 rank: int = 0, workers: int = 2, prefetch: int = 4) -> None:  # fmt: skip
        self.frames, self.batch, self.seed, self.rank = frames, batch, seed, rank
        self.tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        self.workers, self.prefetch = max(1, workers), max(1, prefetch)
        self.sizes = np.asarray(frames.sizes)
        self.cells = frames.class_cells()
        self.overrides: dict[int, np.ndarray] = {}  # row -> corrected mask at the frame's size
        self.set_rows(rows)

    def set_rows(self, rows: np.ndarray, pixels: np.ndarray | None = None) -> None:
        """The training rows and, per row, class pixel counts (default: the stored ones)."""
        self.rows = np.asarray(rows, np.int64)
        counts = pixels if pixels is not None else self.frames.class_pixels
        k = np.shape(counts)[1] if np.ndim(counts) == 2 else NUM_CLASSES
        held = counts[self.rows[self.rows < len(counts)]] if len(counts) else np.zeros((0, k))
        self.by_class = {
            c: self.rows[self.rows < len(counts)][held[:, c] > 0]
            for c in range(1, k)
            if (held[:, c] > 0).any()
        }

    # -- which crops
    def _cells_of(self, row: int) -> np.ndarray:
        if row in self.overrides:
            return cell_counts(self.overrides[row], tuple(self.sizes[row]), self.cells.shape[1])
        return self.cells[row]

    def plan(self, epoch: int, batch: int) -> list[tuple[int, int, int]]:
        """(row, y, x) of each crop of batch ``batch`` of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch, batch, self.rank])
        classes = sorted(self.by_class)
        th, tw = self.tile
        out = []
        for _ in range(self.batch):
            h, w = (0, 0)
            if classes and rng.random() < CLASS_AWARE_SHARE:
                c = classes[rng.integers(len(classes))]
                row = int(self.by_class[c][rng.integers(len(self.by_class[c]))])
                h, w = self.sizes[row]
                cells = self._cells_of(row)[c].astype(np.float64)
                k = rng.choice(cells.size, p=cells.ravel() / cells.sum())
                cy, cx = divmod(k, cells.shape[1])
                y = cy * CELL + rng.integers(CELL) - th // 2
                x = cx * CELL + rng.integers(CELL) - tw // 2
            else:
                row = int(self.rows[rng.integers(len(self.rows))])
                h, w = self.sizes[row]
                y, x = rng.integers(max(1, h - th + 1)), rng.integers(max(1, w - tw + 1))
            y = int(np.clip(y, 0, max(0, h - th)))
            x = int(np.clip(x, 0, max(0, w - tw)))
            out.append((row, y, x))
        return out

    # -- reading them
    def read(self, plan: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        t_h, t_w = self.tile
        images = np.zeros((len(plan), t_h, t_w), np.uint8)
        masks = np.full((len(plan), t_h, t_w), IGNORE_INDEX, np.uint8)  # beyond a small frame
        for k, (row, y, x) in enumerate(plan):
            h, w = self.sizes[row]
            th, tw = min(t_h, h - y), min(t_w, w - x)
            images[k, :th, :tw] = self.frames.images[row, y : y + th, x : x + tw]
            if row in self.overrides:
                masks[k, :th, :tw] = self.overrides[row][y : y + th, x : x + tw]
            elif row < self.frames.n_labelled:
                masks[k, :th, :tw] = self.frames.masks[row, y : y + th, x : x + tw]
        return images, masks

    def batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches ``start..stop-1`` of ``epoch`` in order, read ahead by the threads from
        disk; from memory, read when asked (a copy of a few crops: threads waking between
        the steps' kernels took CPU from them)."""
        if isinstance(self.frames, MemoryFrames):
            for k in range(start, stop):
                yield self.read(self.plan(epoch, k))
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="crops") as pool:
            pending = []
            k = start
            while k < stop or pending:
                while k < stop and len(pending) < self.prefetch:
                    pending.append(pool.submit(lambda b=k: self.read(self.plan(epoch, b))))
                    k += 1
                yield pending.pop(0).result()
