"""The corrections store: edited masks and exclusions, in SQLite, never touching the dataset.

* One database per dataset, in ``<name>.marsviewer/corrections.sqlite`` beside the dataset
  when that folder is writable, else in the user's data folder keyed by the dataset's
  content hash. The database records that hash and refuses another dataset.
* Append-only history: every saved mask (zlib-compressed), exclusion, inclusion and
  restore is a row that is never changed or deleted; each image's rows form a tree that
  undo and redo walk (``correction_history.py``).
* WAL mode and one transaction per action: a training process can read while the GUI
  writes, a reader never sees half an action, and with ``synchronous=FULL`` an action
  that returned is on disk even if the process is killed right after.
* Images are found again by key: their name for folders and zarr datasets, so images
  added to the dataset later (which moves the others' positions) orphan nothing; their
  position for npz and synthetic data, whose content hash the store records and checks.
  The store records its schema version; a store of version 1 (rows by position under a
  content hash) is migrated in place when it is opened for its unchanged dataset.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import warnings
import zlib
from pathlib import Path

import numpy as np

from .correction_history import Entry, HistoryTree
from .corrections_db import CARRIED_UP_TO, CorrectionsError, connect, db_key, key_of, open_schema, transaction
from .dataset import Dataset, FileWarning
from .store_location import (
    dataset_hash,
    default_store_path,
    existing_store_path,
    identity,
    keyed_by_name,
    row_keys,
)

__all__ = [
    "CorrectionStore",
    "CorrectionsError",
    "Entry",
    "dataset_hash",
    "default_store_path",
    "existing_store_path",
    "identity",
    "keyed_by_name",
    "row_keys",
]

ACTIONS = ("mask", "restore", "exclude", "include")


class CorrectionStore(HistoryTree):
    """Corrections of one dataset of ``n`` masks of ``shape``, and labels of its ``n_pool``
    unlabelled images: image ``n + j`` is unlabelled image ``j``. Such an image's original
    mask is "not labelled" (all background): a saved mask makes it a training image,
    restore makes it unlabelled again.

    ``keys`` (one per image, labelled then unlabelled; default: the positions) are how
    the store finds each image again. With ``by_name`` (folders, zarr datasets) they are
    the images' names and the dataset may change around them; otherwise the store is tied
    to ``content_hash`` and refuses any other content. ``shape`` is every mask's shape, or
    one shape per image for datasets of frames of several sizes.
    """

    def __init__(
        self,
        path: str | Path,
        content_hash: str | None,
        n: int,
        shape,
        readonly: bool = False,
        n_pool: int = 0,
        keys: list[str] | None = None,
        by_name: bool = False,
    ) -> None:
        self.path = Path(path)
        self.n, self.n_pool, self.by_name = n, n_pool, by_name
        shapes = list(shape) if shape and not isinstance(shape[0], (int, np.integer)) else None
        self.shape = tuple(shape) if shapes is None else None
        self._shapes = None if shapes is None else [tuple(int(v) for v in s) for s in shapes]
        if self._shapes is not None and len(self._shapes) != n + n_pool:
            raise ValueError(f"{len(self._shapes)} shapes for {n + n_pool} images")
        self.keys = list(keys) if keys is not None else row_keys(range(n), range(n_pool))
        if len(self.keys) != n + n_pool or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"expected {n + n_pool} distinct image keys, got {len(set(self.keys))}")
        self.misfits: set[str] = set()  # images whose saved mask no longer fits them
        way_out = (
            f"nothing in it was changed; to go on without these corrections, move the folder "
            f"{self.path.parent} aside (or give --no-corrections to a command)"
        )
        empty = self.path.is_file() and self.path.stat().st_size == 0
        try:
            self.db = connect(self.path, readonly)
            self._legacy = open_schema(self.db, self.path, self.keys, by_name, content_hash, readonly)
        except sqlite3.Error as exc:
            raise CorrectionsError(
                f"{self.path}: not a readable corrections database ({exc}): damaged or another kind of "
                f"file; {way_out}"
            ) from None
        except CorrectionsError as exc:
            if "another dataset" in str(exc) or "newer marsviewer" in str(exc):
                raise
            raise CorrectionsError(f"{exc}; {way_out}") from None
        if empty and not readonly:
            warnings.warn(
                f"{self.path}: the corrections database was an empty file (0 bytes): it starts anew "
                "with no corrections",
                FileWarning,
                stacklevel=2,
            )
        self._load_ids()

    def _load_ids(self) -> None:
        if self._legacy:
            self._id_of_key = {k: i for i, k in enumerate(self.keys)}
        else:
            self._id_of_key = {key_of(k): i for i, k in self.db.execute("SELECT id, key FROM images")}
        self._known_ids = set(self._id_of_key.values())
        self._row_of_id = {}
        for row, key in enumerate(self.keys):
            if key in self._id_of_key:
                self._row_of_id[self._id_of_key[key]] = row

    def _row(self, image_id: int) -> int | None:
        """The row of a stored image id; None when the image is no longer in the dataset."""
        if image_id not in self._known_ids:
            self._load_ids()  # another process added images since
        return self._row_of_id.get(image_id)

    @classmethod
    def for_dataset(
        cls,
        dataset,
        path: str | Path | None = None,
        original_masks: np.ndarray | None = None,
        readonly: bool = False,
    ) -> CorrectionStore:
        """The store of a :class:`Dataset` (or a zarr dataset read from disk): the one at
        ``path``, else the one found for it, else a new one beside it."""
        ident = identity(dataset, original_masks)
        path = path or default_store_path(dataset.source, ident["content_hash"])
        return cls(path, readonly=readonly, **ident)

    @classmethod
    def existing(cls, dataset, path: str | Path | None = None, readonly: bool = False):
        """The dataset's store if it has one (``path``, or where one is found), else None."""
        ident = identity(dataset)
        target = Path(path) if path else existing_store_path(dataset.source, ident["content_hash"])
        if target is None or not target.exists():
            return None
        return cls(target, readonly=readonly, **ident)

    def close(self) -> None:
        self.db.close()

    def shape_of(self, image: int) -> tuple[int, int]:
        return self.shape if self._shapes is None else self._shapes[image]

    # -- writing ---------------------------------------------------------------
    def _check(self, image: int) -> int:
        image = int(image)
        if not 0 <= image < self.n + self.n_pool:
            raise IndexError(f"image {image} out of range 0..{self.n + self.n_pool - 1}")
        return image

    def _id(self, image: int, create: bool = False) -> int | None:
        """The stored id of row ``image``; with ``create`` (inside a write transaction)
        a new one for an image the store has not seen."""
        key = self.keys[image]
        found = self._id_of_key.get(key)
        if found is None:
            row = self.db.execute("SELECT id FROM images WHERE key=?", (db_key(key),)).fetchone()
            if row is None and create:
                row = (self.db.execute("INSERT INTO images (key) VALUES (?)", (db_key(key),)).lastrowid,)
            if row is not None:
                found = self._id_of_key[key] = row[0]
                self._row_of_id[found] = image
                self._known_ids.add(found)
        return found

    def _append(self, image: int, action: str, mask: np.ndarray | None = None, note: str = "") -> int:
        image = self._check(image)
        blob = None
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.shape != self.shape_of(image):
                raise ValueError(f"mask of image {image} is {mask.shape}; expected {self.shape_of(image)}")
            if mask.max(initial=0) > 4:
                raise ValueError(f"mask of image {image} has class {int(mask.max())}; expected 0..4")
            blob = zlib.compress(mask.tobytes(), 6)
        entry = self._add_entry(image, action, blob, note)
        self.misfits.discard(self.keys[image])
        return entry

    def save_mask(self, image: int, mask: np.ndarray, note: str = "") -> int:
        return self._append(image, "mask", mask, note)

    def restore(self, image: int, note: str = "") -> int:
        """Make the original mask effective again (the edits stay in the history)."""
        return self._append(image, "restore", note=note)

    def exclude(self, image: int, note: str = "") -> int:
        return self._append(image, "exclude", note=note)

    def include(self, image: int, note: str = "") -> int:
        return self._append(image, "include", note=note)

    def exclude_many(self, images, note: str = "") -> None:
        for i in images:
            if not self.is_excluded(i):
                self.exclude(i, note)

    def mark_carried(self) -> None:
        """Record that all the store holds so far was carried from another dataset's
        store, where it still is (an export's exclusions, a converted folder's
        corrections): as long as nothing is added,
        :func:`~trainer.store_location.holds_only_carried` says the store can go without
        losing anything."""
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (CARRIED_UP_TO, str(self.version())))

    # -- reading ---------------------------------------------------------------
    def state(self, image: int) -> tuple[np.ndarray | None, bool]:
        """(edited mask or None for the original, excluded?) of one image."""
        image = self._check(image)
        with self._reading():
            return self._state(image)

    def _state(self, image: int) -> tuple[np.ndarray | None, bool]:
        blob, excluded = self._walk(image)
        return (None if blob is None else self._decode(image, blob)), excluded

    def _decode(self, image: int, blob: bytes) -> np.ndarray | None:
        """A saved mask, or None (the original counts) when the image changed size since."""
        shape = self.shape_of(image)
        raw = zlib.decompress(blob)
        if len(raw) != shape[0] * shape[1]:
            self.misfits.add(self.keys[image])
            return None
        return np.frombuffer(raw, np.uint8).reshape(shape).copy()

    def effective_mask(self, image: int, original: np.ndarray) -> np.ndarray:
        mask, _ = self.state(image)
        return original if mask is None else mask

    def is_excluded(self, image: int) -> bool:
        return self.state(image)[1]

    def _current_rows(self) -> list[int]:
        ids = [r[0] for r in self.db.execute("SELECT image FROM cursors WHERE entry IS NOT NULL")]
        rows = (self._row(i) for i in ids)
        return sorted(r for r in rows if r is not None)

    def snapshot(self) -> tuple[dict[int, np.ndarray], set[int]]:
        """All edited masks and excluded images, read in one transaction."""
        edited, excluded = {}, set()
        with self._reading():
            for i in self._current_rows():
                mask, ex = self._state(i)
                if mask is not None:
                    edited[i] = mask
                if ex:
                    excluded.add(i)
        return edited, excluded

    def excluded(self) -> set[int]:
        """The excluded images, without decompressing any mask."""
        with self._reading():
            return {i for i in self._current_rows() if self._walk(i)[1]}

    def edited(self) -> set[int]:
        """The images with a saved mask in effect, without decompressing any."""
        with self._reading():
            return {i for i in self._current_rows() if self._walk(i)[0] is not None}

    def orphans(self) -> list[str]:
        """Names of images with saved corrections that the dataset no longer has (kept in
        the store: they come back if the images do)."""
        if self._legacy:
            return []
        rows = self.db.execute(
            "SELECT images.key FROM cursors JOIN images ON images.id = cursors.image "
            "WHERE cursors.entry IS NOT NULL ORDER BY images.key"
        ).fetchall()
        known = set(self.keys)
        return [key_of(k) for (k,) in rows if key_of(k) not in known]

    def pool_labels(self) -> dict[int, np.ndarray]:
        """Unlabelled image j -> its saved mask, for those that have one now."""
        edited, _ = self.snapshot()
        return {i - self.n: m for i, m in sorted(edited.items()) if i >= self.n}

    def apply(self, dataset: Dataset) -> tuple[Dataset, set[int]]:
        """The dataset with effective masks and the unlabelled images labelled since
        appended to it (a copy; the dataset is unchanged; ``test_images`` stay as they
        are), and the excluded set (indices into the returned dataset)."""
        edited, excluded = self.snapshot()
        masks = dataset.masks.copy()
        for i, m in edited.items():
            if i < self.n:
                masks[i] = m
        labelled = sorted(i for i in edited if i >= self.n)
        if not labelled or dataset.test_images is None:
            return dataclasses.replace(dataset, masks=masks), excluded
        rows = np.array(labelled) - self.n
        return (
            dataclasses.replace(
                dataset,
                images=np.concatenate([dataset.images, dataset.test_images[rows]]),
                masks=np.concatenate([masks, np.stack([edited[i] for i in labelled])]),
                names=list(dataset.names) + [dataset.test_names[j] for j in rows],
            ),
            {
                i if i < self.n else self.n + labelled.index(i)
                for i in excluded
                if i < self.n or i in labelled
            },
        )
