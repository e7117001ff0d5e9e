"""Damage in a converted dataset is an error, never data.

zarr reads a chunk file it cannot find as a chunk of fill values (zeros): here a store
notes such a key, and :class:`CheckedFrames` (what a :class:`~.zarr_dataset.StoredDataset`
reads its frames through) turns it, and any chunk that fails to decode or to match its
checksum, into one :class:`~trainer.dataset.DatasetError` naming the dataset, the frame and
the chunk file. Datasets written before every chunk was stored may lack the chunks of masks
with no labelled pixel (zarr left out chunks of fill values): those may be missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..dataset import DatasetError

if TYPE_CHECKING:
    from .zarr_dataset import StoredDataset


def refuse_missing(path: Path, store) -> None:
    """A table read whole (sizes, class counts) whose chunk file is missing: damage."""
    if store.missing:
        key = sorted(store.missing)[0]
        raise DatasetError(
            f"{path}: its chunk file {path / key} is missing; convert the dataset again from its source"
        )


def chunk_index(key: str) -> int:
    """The first index of a chunk file's key (``images/c/3/0/0`` -> 3): the frame for a
    shard, the block of ``rows_per_file`` frames for a chunk of many."""
    return int(key.partition("/c/")[2].split("/")[0])


def rows_per_file(array) -> int:
    """Frames stored in one chunk file (a shard holds one frame)."""
    shards = getattr(array, "shards", None)
    return int((shards or array.chunks)[0])


def why(exc: BaseException) -> str:
    if "checksum" in str(exc).lower():
        return "its checksum does not match its content"
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DamagedChunk(DatasetError):
    """A chunk file of a stored dataset that is missing."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def chunk_checked_store(path: Path):
    """A read-only zarr store over ``path`` in which a missing chunk file of the frames
    is an error, not a frame of zeros (zarr's reading of a chunk it cannot find)."""
    from zarr.storage import LocalStore

    class ChunkCheckedStore(LocalStore):
        every_chunk = True  # until the attributes say otherwise
        unlabelled_rows: frozenset = frozenset()
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
            first = chunk_index(key) * per
            return set(range(first, first + per)) <= self.unlabelled_rows

    return ChunkCheckedStore(path, read_only=True)


def drain_zarr() -> None:
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
            drain_zarr()
            raise DatasetError(self._describe(key, exc)) from None
        missing = self._array.store.missing
        if missing:
            per = rows_per_file(self._array)
            asked = self._rows(key)
            files = None if asked is None else {r // per for r in asked}
            mine = sorted(
                k
                for k in missing
                if k.startswith(self._name + "/c/") and (files is None or chunk_index(k) in files)
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
        per = rows_per_file(self._array)
        first = key[0] if isinstance(key, tuple) and key else key
        if isinstance(exc, DamagedChunk):
            start = chunk_index(exc.key) * per
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
            what = f"{where} is damaged ({why(exc)})"
        frame = (
            f"frame {row} ({ds.names[row]})" if row is not None and 0 <= row < len(ds.names) else "a frame"
        )
        return f"{ds.path}: the {self._name[:-1]} of {frame} cannot be read: {what}; convert the dataset again from its source"
