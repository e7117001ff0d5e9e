"""The chunked on-disk dataset: a zarr (v3) group that napari and the trainer read lazily.

Layout of ``NAME.zarr``::

    zarr.json        attributes: format "marsviewer-dataset", version, complete, id,
                     source, mask_mapping, image_rule, classes, names, n_labelled
    images           (N, H, W) uint8: the labelled frames, then the unlabelled ones
    masks            (n_labelled, H, W) uint8 class ids
    sizes            (N, 2) int32: each frame's own height and width; frames smaller than
                     (H, W) sit in the top-left corner, the rest is 0 ("not labelled")
    class_pixels     (n_labelled, C) int64: pixels of each class in each mask
    class_cells      (n_labelled, C, H/64, W/64) uint16: the same per 64x64 cell, for
                     class-aware crops without reading masks

Frames of at most 256x256 are stored many to a chunk of ~1 MB. A larger frame is a
shard of its own (one file) cut into chunks of at most 512x512, so reading a frame
decompresses that frame and nothing else, and a crop only the chunks it covers.
``complete`` is set last, after every frame is written: a store without it (a convert
that stopped) is refused, and convert writes under ``NAME.zarr.partial`` and renames only
when done. Every chunk is written and checksummed (``every_chunk_written``), so that a
chunk damaged later is an error when read (:mod:`.zarr_checks`), never zeros. Writing is
:mod:`.zarr_writer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..classes import COMPETITION, ClassTable, ClassTableError
from ..dataset import Dataset, DatasetError
from .zarr_checks import CheckedFrames, chunk_checked_store, drain_zarr, refuse_missing, rows_per_file, why

FORMAT = "marsviewer-dataset"
VERSION = 1
CELL = 64
IMAGE_RULE = (
    "RGB -> ITU-R 601 luma; 16-bit and float stretched from their minimum to their maximum onto 0..255"
)
# A stored dataset whose frames all have one size and whose arrays take less than this is
# read into memory for training (faster there); larger ones train from disk by crops.
IN_MEMORY_BYTES = 1 << 30


def chunk_layout(h: int, w: int) -> tuple[tuple[int, int, int], tuple[int, int, int] | None, int]:
    """(chunks, shards, block) of an (N, h, w) frame array. Frames of at most 256x256: many
    to a ~1 MB chunk, no shards. Larger frames: a shard (one file) a frame, cut into chunks
    of at most 512x512, so a frame read decompresses that frame only (not the 16 frames a
    chunk of many would hold) and a crop only the chunks it covers. ``block``: the frames
    the writer gathers into one write (whole chunks or shards, ~16 MB at most)."""
    if h <= 256 and w <= 256:
        chunks = (max(1, (1 << 20) // (h * w)), h, w)
        return chunks, None, chunks[0]
    ch, cw = min(h, 512), min(w, 512)
    return (1, ch, cw), (1, -(-h // ch) * ch, -(-w // cw) * cw), max(1, (16 << 20) // (h * w))


def is_zarr(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".zarr" or (p.is_dir() and (p / "zarr.json").exists())


@dataclass
class StoredDataset:
    """A converted dataset, opened lazily: only attributes and small tables are read.

    ``images[i]`` / ``masks[i]`` read one padded frame; :meth:`image` and :meth:`mask`
    return it at its own size. Row ``n_labelled + j`` of ``images`` is unlabelled image j.
    """

    path: Path
    images: object  # zarr.Array (N, H, W)
    masks: object  # zarr.Array (n_labelled, H, W)
    sizes: np.ndarray
    names: list[str]
    n_labelled: int
    class_pixels: np.ndarray
    attrs: dict = field(default_factory=dict)
    # The chunk last read for image() and mask(): small frames are stored many to a chunk,
    # and reading them in order (validation, predict, suggest) then reads each chunk once.
    _last_chunk: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def source(self) -> str:
        return str(self.path)

    @cached_property
    def classes(self) -> ClassTable:
        """The dataset's class table (its ``classes`` attribute; checked when opened)."""
        return stored_classes(self.attrs, self.path)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def id(self) -> str:
        return self.attrs.get("id", "")

    def __len__(self) -> int:
        return self.n_labelled

    @property
    def n_unlabelled(self) -> int:
        return len(self.names) - self.n_labelled

    @property
    def test_names(self) -> list[str]:
        return self.names[self.n_labelled :]

    @property
    def labelled_names(self) -> list[str]:
        return self.names[: self.n_labelled]

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def uniform(self) -> bool:
        return bool(len(self.sizes)) and bool((self.sizes == self.sizes[0]).all())

    @property
    def nbytes(self) -> int:
        h, w = self.frame_shape
        return (len(self.names) + self.n_labelled) * h * w

    def image(self, i: int) -> np.ndarray:
        return self._frame("images", self.images, i)

    def mask(self, i: int) -> np.ndarray:
        return self._frame("masks", self.masks, i)

    def _frame(self, key: str, array, i: int) -> np.ndarray:
        """Frame ``i`` of ``array`` at its own size."""
        i = int(i)
        n = len(self.names) if key == "images" else self.n_labelled
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: frame {i} of {key} out of range 0..{n - 1}")
        h, w = (int(v) for v in self.sizes[i])
        rows = int(array.chunks[0])
        if rows == 1:
            return np.asarray(array[i, :h, :w])
        c = i // rows
        last = self._last_chunk.get(key)
        if last is None or last[0] != c:
            last = (c, np.asarray(array[c * rows : (c + 1) * rows]))
            self._last_chunk[key] = last  # one assignment: threads see a whole chunk or none
        return last[1][i - c * rows, :h, :w].copy()

    def class_cells(self) -> np.ndarray:
        import zarr

        store = chunk_checked_store(self.path)
        try:
            cells = np.asarray(zarr.open_array(store=store, path="class_cells", mode="r")[:])
        except Exception as exc:
            drain_zarr()
            raise DatasetError(
                f"{self.path}: its class_cells table is damaged ({why(exc)}); convert the dataset again"
            ) from None
        refuse_missing(self.path, store)
        return cells

    def to_memory(self) -> Dataset:
        """The whole store as an in-memory :class:`Dataset` (frames of one size only)."""
        if not self.uniform:
            raise DatasetError(
                f"{self.path}: its frames have several sizes; it trains from disk by crops (--tile)"
            )
        h, w = (int(v) for v in self.sizes[0]) if len(self.sizes) else self.frame_shape
        n = self.n_labelled
        images = np.asarray(self.images[:, :h, :w]) if len(self.names) else np.zeros((0, h, w), np.uint8)
        masks = np.asarray(self.masks[:, :h, :w]) if n else np.zeros((0, h, w), np.uint8)
        return Dataset(
            images=images[:n],
            masks=masks,
            test_images=images[n:] if len(images) > n else None,
            source=str(self.path),
            names=self.names[:n],
            test_names=self.names[n:],
            classes=self.classes,
        )


def stored_classes(attrs: dict, path) -> ClassTable:
    """The table in a store's attributes (``[[id, name, "#rrggbb"], ...]``); a store
    written before tables were declared holds the competition's."""
    if "classes" not in attrs:
        return COMPETITION
    try:
        return ClassTable.from_records(attrs["classes"], f"{path}: its class table")
    except ClassTableError as exc:
        raise DatasetError(f"{exc}; convert the dataset again") from None


def open_zarr(path: str | Path) -> StoredDataset:
    """Open a dataset written by ``mars-trainer convert``; anything else is refused."""
    import zarr

    path = Path(path)
    if Path(str(path) + ".partial").exists() and not (path / "zarr.json").exists():
        raise DatasetError(
            f"{path}: the conversion that was writing it did not finish (only {path.name}.partial "
            "exists); run convert again"
        )
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset")
    store = chunk_checked_store(path)
    try:
        group = zarr.open_group(store=store, mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:  # zarr raises several types for a foreign or broken store
        raise DatasetError(f"{path}: not a readable zarr store ({type(exc).__name__}: {exc})") from None
    if attrs.get("format") != FORMAT:
        raise DatasetError(
            f"{path}: a zarr store, but not a marsviewer dataset (no format attribute {FORMAT!r}); "
            "write one with: mars-trainer convert SRC --out DATASET.zarr"
        )
    if int(attrs.get("version", 0)) > VERSION:
        raise DatasetError(
            f"{path}: written by a newer marsviewer (dataset version {attrs['version']}, this one reads "
            f"up to {VERSION}); upgrade marsviewer"
        )
    if not attrs.get("complete"):
        raise DatasetError(f"{path}: the conversion that wrote it did not finish; convert again")
    try:
        images, masks = group["images"], group["masks"]
        sizes = np.asarray(group["sizes"][:])
        class_pixels = np.asarray(group["class_pixels"][:])
    except KeyError as exc:
        raise DatasetError(f"{path}: incomplete dataset, array {exc} is missing; convert again") from None
    except Exception as exc:  # a damaged table: zarr and its codecs raise several types
        raise DatasetError(
            f"{path}: damaged dataset ({why(exc)}); convert it again from its source"
        ) from None
    refuse_missing(path, store)  # the tables of sizes and class counts
    # Datasets written before every chunk was stored and checksummed may lack the chunks
    # of masks that hold no labelled pixel (zarr leaves out chunks of fill values).
    store.every_chunk = bool(attrs.get("every_chunk_written"))
    classes = stored_classes(attrs, path)
    if class_pixels.ndim != 2 or class_pixels.shape[1] != len(classes):
        raise DatasetError(
            f"{path}: its class counts ({class_pixels.shape}) do not fit its {len(classes)} classes; convert again"
        )
    if class_pixels.ndim == 2:
        store.unlabelled_rows = frozenset(np.flatnonzero(class_pixels[:, 1:].sum(axis=1) == 0).tolist())
    names = list(attrs.get("names", []))
    n = int(attrs.get("n_labelled", 0))
    if len(names) != images.shape[0] or masks.shape[0] != n or len(sizes) != len(names):
        raise DatasetError(
            f"{path}: inconsistent dataset ({images.shape[0]} images, {len(names)} names, "
            f"{masks.shape[0]} masks for {n} labelled); convert again"
        )
    store.rows_per_file = {"images": rows_per_file(images), "masks": rows_per_file(masks)}
    stored = StoredDataset(path, images, masks, sizes, names, n, class_pixels, attrs)
    stored.images = CheckedFrames(images, stored, "images")
    stored.masks = CheckedFrames(masks, stored, "masks")
    return stored
