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
when done.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..classes import CLASSES, NUM_CLASSES
from ..dataset import Dataset, DatasetError

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

        store = _ChunkCheckedStore(self.path)
        try:
            cells = np.asarray(zarr.open_array(store=store, path="class_cells", mode="r")[:])
        except Exception as exc:
            _drain_zarr()
            raise DatasetError(
                f"{self.path}: its class_cells table is damaged ({_why(exc)}); convert the dataset again"
            ) from None
        _refuse_missing(self.path, store)
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
        )


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
    store = _ChunkCheckedStore(path)
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
            f"{path}: damaged dataset ({_why(exc)}); convert it again from its source"
        ) from None
    _refuse_missing(path, store)  # the tables of sizes and class counts
    # Datasets written before every chunk was stored and checksummed may lack the chunks
    # of masks that hold no labelled pixel (zarr leaves out chunks of fill values).
    store.every_chunk = bool(attrs.get("every_chunk_written"))
    store.unlabelled_rows = (
        np.flatnonzero(class_pixels[:, 1:].sum(axis=1) == 0) if n_rows(class_pixels) else []
    )
    names = list(attrs.get("names", []))
    n = int(attrs.get("n_labelled", 0))
    if len(names) != images.shape[0] or masks.shape[0] != n or len(sizes) != len(names):
        raise DatasetError(
            f"{path}: inconsistent dataset ({images.shape[0]} images, {len(names)} names, "
            f"{masks.shape[0]} masks for {n} labelled); convert again"
        )
    store.rows_per_file = {"images": _rows_per_file(images), "masks": _rows_per_file(masks)}
    stored = StoredDataset(path, images, masks, sizes, names, n, class_pixels, attrs)
    stored.images = CheckedFrames(images, stored, "images")
    stored.masks = CheckedFrames(masks, stored, "masks")
    return stored


def _refuse_missing(path: Path, store) -> None:
    """A table read whole (sizes, class counts) whose chunk file is missing: damage."""
    if store.missing:
        key = sorted(store.missing)[0]
        raise DatasetError(
            f"{path}: its chunk file {path / key} is missing; convert the dataset again from its source"
        )


def n_rows(table: np.ndarray) -> int:
    return int(table.shape[0]) if table.ndim else 0


def _rows_per_file(array) -> int:
    """Frames stored in one chunk file (a shard holds one frame)."""
    shards = getattr(array, "shards", None)
    return int((shards or array.chunks)[0])


def _why(exc: BaseException) -> str:
    if "checksum" in str(exc).lower():
        return "its checksum does not match its content"
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DamagedChunk(DatasetError):
    """A chunk file of a stored dataset that is missing."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _ChunkCheckedStore(path: Path):
    """A read-only zarr store over ``path`` in which a missing chunk file of the frames
    is an error, not a frame of zeros (zarr's reading of a chunk it cannot find)."""
    from zarr.storage import LocalStore

    class ChunkCheckedStore(LocalStore):
        every_chunk = True  # until the attributes say otherwise
        unlabelled_rows: object = ()
        rows_per_file: dict = {}  # noqa: RUF012 (set per instance)

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # Missing chunk keys are noted here and raised by CheckedFrames once zarr's
            # read has ended: raised inside it, they would leave its other reads pending.
            self.missing: set[str] = set()

        async def get(self, key, prototype=None, byte_range=None):
            found = await super().get(key, prototype, byte_range)
            if found is None and "/c/" in key and not self._may_be_missing(key):
                self.missing.add(key)
            return found

        def _may_be_missing(self, key: str) -> bool:
            name, _, rest = key.partition("/c/")
            if self.every_chunk or name != "masks":
                return False
            per = self.rows_per_file.get(name, 1)
            first = int(rest.split("/")[0]) * per
            rows = set(range(first, first + per))
            return rows <= set(int(r) for r in self.unlabelled_rows) or not rows

    return ChunkCheckedStore(path, read_only=True)


def _drain_zarr() -> None:
    """Let the reads zarr started beside one that failed end, so that none is left
    pending (asyncio then complains at exit)."""
    import asyncio

    from zarr.core.sync import sync

    async def rest() -> None:
        me = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me), return_exceptions=True)

    try:
        sync(rest(), timeout=30)
    except Exception:  # draining is a courtesy; the error that brought us here matters
        pass


class CheckedFrames:
    """A stored dataset's frame array (zarr) whose every read either returns the frames
    as written or raises one :class:`~trainer.dataset.DatasetError` naming the dataset,
    the frame and its chunk file: a missing, truncated or garbled chunk is never data.
    Everything else (shape, dtype, chunks, resize) is the zarr array's."""

    def __init__(self, array, dataset: StoredDataset, name: str) -> None:
        self._array, self._dataset, self._name = array, dataset, name

    def __getattr__(self, attr):
        return getattr(self._array, attr)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)

    def __getitem__(self, key):
        try:
            frames = self._array[key]
        except Exception as exc:
            _drain_zarr()
            raise DatasetError(self._describe(key, exc)) from None
        missing = self._array.store.missing
        if missing:
            per = _rows_per_file(self._array)
            asked = self._rows(key)
            mine = sorted(
                k
                for k in missing
                if k.startswith(self._name + "/c/")
                and (asked is None or int(k.partition("/c/")[2].split("/")[0]) in {r // per for r in asked})
            )
            if mine:
                raise DatasetError(self._describe(key, DamagedChunk(mine[0])))
        return frames

    def _rows(self, key) -> range | list[int] | None:
        """The frames a read of ``key`` covers (None: not known, any)."""
        first = key[0] if isinstance(key, tuple) and key else key
        n = len(self)
        if isinstance(first, int | np.integer):
            return [int(first) % n] if n else []
        if isinstance(first, slice):
            return range(*first.indices(n))
        return None

    def _first_bad(self, rows, per: int) -> int | None:
        """The first frame of ``rows`` (a slice) whose chunk file cannot be read."""
        if not isinstance(rows, slice):
            return None
        for start in range(*rows.indices(len(self)))[::per]:
            try:
                self._array[start]
            except Exception:
                return int(start)
        return None

    def _describe(self, key, exc: BaseException) -> str:
        ds = self._dataset
        per = _rows_per_file(self._array)
        first = key[0] if isinstance(key, tuple) and key else key
        if isinstance(exc, DamagedChunk):
            start = int(exc.key.partition("/c/")[2].split("/")[0]) * per
            asked = [r for r in (self._rows(key) or []) if start <= r < start + per]
            row = asked[0] if asked else start  # the first frame asked for that the file holds
            what = f"its chunk file {ds.path / exc.key} is missing"
        else:
            row = first if isinstance(first, int | np.integer) else self._first_bad(first, per)
            if row is not None and row < 0:
                row += len(self)
            where = (
                f"its chunk file {ds.path / self._name / 'c' / str(row // per) / '0' / '0'}"
                if row is not None
                else "one of its chunk files"
            )
            what = f"{where} is damaged ({_why(exc)})"
        frame = (
            f"frame {row} ({ds.names[row]})" if row is not None and 0 <= row < len(ds.names) else "a frame"
        )
        return f"{ds.path}: the {self._name[:-1]} of {frame} cannot be read: {what}; convert the dataset again from its source"


class ZarrWriter:
    """Writes a dataset frame by frame under ``OUT.partial``; :meth:`finish` marks it
    complete and renames it to ``OUT``. Frames come in blocks (:func:`chunk_layout`) of
    whole chunks or shards, so each block is one write and nothing larger than a block is
    held."""

    def __init__(self, out: Path, n_labelled: int, n_total: int, frame: tuple[int, int], attrs: dict):
        import zarr

        self.out, self.tmp = out, out.with_name(out.name + ".partial")
        if self.tmp.exists():
            import shutil

            shutil.rmtree(self.tmp)
        h, w = frame
        chunks, shards, self.block_frames = chunk_layout(h, w)
        try:
            self.group = zarr.open_group(self.tmp, mode="w")
        except OSError as exc:
            from ..outputs import could_not_write

            self.abandon()
            raise could_not_write(out, exc) from None
        gh, gw = -(-h // CELL), -(-w // CELL)

        from zarr.codecs import Crc32cCodec, ZstdCodec

        def array(name, shape, dtype, chunks, shards=None):
            # Every chunk is written (also all-zero ones) and carries a checksum: a chunk
            # file missing or damaged later is then an error when read, never zeros.
            return self.group.create_array(
                name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0,
                compressors=[ZstdCodec(level=0), Crc32cCodec()], config={"write_empty_chunks": True},
            )  # fmt: skip

        self.images = array("images", (n_total, h, w), "uint8", chunks, shards)
        self.masks = array("masks", (n_labelled, h, w), "uint8", chunks, shards)
        self.sizes = np.zeros((n_total, 2), np.int32)
        self.class_pixels = np.zeros((n_labelled, NUM_CLASSES), np.int64)
        self.class_cells = array(
            "class_cells", (n_labelled, NUM_CLASSES, gh, gw), "uint16", (256, NUM_CLASSES, gh, gw)
        )
        self.attrs = {
            "format": FORMAT, "version": VERSION, "complete": False, "id": uuid.uuid4().hex,
            "image_rule": IMAGE_RULE, "classes": [[c.id, c.name, c.hex] for c in CLASSES],
            "every_chunk_written": True, **attrs,
        }  # fmt: skip
        self.group.attrs.update(self.attrs)
        self.frame = (h, w)
        self._block: list[tuple[int, np.ndarray, np.ndarray | None]] = []

    def add(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Frame ``row`` (rows are added in order)."""
        h, w = image.shape
        self.sizes[row] = (h, w)
        if mask is not None:
            self.class_pixels[row] = np.bincount(mask.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
        self._block.append((row, image, mask))
        if len(self._block) == self.block_frames:
            self._flush()

    def _flush(self) -> None:
        if not self._block:
            return
        H, W = self.frame
        rows = [r for r, _, _ in self._block]
        lo, hi = rows[0], rows[-1] + 1
        if hi - lo != len(rows):
            raise AssertionError("frames must be added in order")
        block = np.zeros((hi - lo, H, W), np.uint8)
        for k, (_, image, _) in enumerate(self._block):
            block[k, : image.shape[0], : image.shape[1]] = image
        self.images[lo:hi] = block
        labelled = [(r, m) for r, _, m in self._block if m is not None]
        if labelled:
            mlo, mhi = labelled[0][0], labelled[-1][0] + 1
            mblock = np.zeros((mhi - mlo, H, W), np.uint8)
            for r, m in labelled:
                mblock[r - mlo, : m.shape[0], : m.shape[1]] = m
            self.masks[mlo:mhi] = mblock
            self.class_cells[mlo:mhi] = np.stack([_cell_counts(m, self.frame) for _, m in labelled])
        self._block = []

    def finish(self, names: list[str], n_labelled: int) -> Path:
        """Close the dataset with ``names`` (rows beyond them, frames that were skipped,
        are cut off) and move it to its final name."""
        from ..outputs import replace_into

        self._flush()
        n = len(names)
        if n < self.images.shape[0] or n_labelled < self.masks.shape[0]:
            self.images.resize((n, *self.frame))
            self.masks.resize((n_labelled, *self.frame))
            self.class_cells.resize((n_labelled, *self.class_cells.shape[1:]))
            self.sizes, self.class_pixels = self.sizes[:n], self.class_pixels[:n_labelled]
        self.group.create_array("sizes", data=self.sizes, chunks=self.sizes.shape or (1, 2))
        self.group.create_array("class_pixels", data=self.class_pixels, chunks=self.class_pixels.shape)
        self.group.attrs.update({"names": names, "n_labelled": int(self.masks.shape[0]), "complete": True})
        replace_into(self.tmp, self.out)  # a dataset already there goes only once this one is in place
        return self.out

    def abandon(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _cell_counts(mask: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """(C, ceil(H/64), ceil(W/64)) pixel counts of each class per 64x64 cell of the frame."""
    gh, gw = -(-frame[0] // CELL), -(-frame[1] // CELL)
    padded = np.full((gh * CELL, gw * CELL), 255, np.uint8)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    blocks = padded.reshape(gh, CELL, gw, CELL).transpose(0, 2, 1, 3).reshape(gh, gw, -1)
    return np.stack([(blocks == c).sum(-1) for c in range(NUM_CLASSES)]).astype(np.uint16)
