"""The corrections store: edited masks and exclusions, in SQLite, never touching the dataset.

* One database per dataset, in ``<name>.marsviewer/corrections.sqlite`` beside the dataset
  when that folder is writable, else in the user's data folder keyed by the dataset's
  content hash. The database records that hash and refuses another dataset.
* Append-only history: every saved mask (zlib-compressed), exclusion, inclusion and
  restore is a row that is never changed or deleted. Each row points to the row that
  was current for its image when it was written (its parent), so the history of an image
  is a tree: undo moves the image's cursor to the parent, redo to the newest child, and
  a save after an undo starts a new branch without losing the old one.
* WAL mode and one transaction per action: a training process can read while the GUI
  writes, a reader never sees half an action, and with ``synchronous=FULL`` an action
  that returned is on disk even if the process is killed right after.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Dataset
from .store_location import dataset_hash, default_store_path, existing_store_path

__all__ = [
    "CorrectionStore",
    "CorrectionsError",
    "Entry",
    "dataset_hash",
    "default_store_path",
    "existing_store_path",
]

ACTIONS = ("mask", "restore", "exclude", "include")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image INTEGER NOT NULL,
    parent INTEGER,
    action TEXT NOT NULL,
    mask BLOB,
    time REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_image ON entries (image);
CREATE TABLE IF NOT EXISTS cursors (image INTEGER PRIMARY KEY, entry INTEGER);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY AUTOINCREMENT, image INTEGER, what TEXT, entry INTEGER, time REAL);
"""


class CorrectionsError(RuntimeError):
    """The store cannot be opened or does not belong to this dataset."""


@dataclass(frozen=True)
class Entry:
    id: int
    image: int
    parent: int | None
    action: str
    time: float
    note: str
    current: bool = False


class CorrectionStore:
    """Corrections of one dataset of ``n`` masks of ``shape``, and labels of its ``n_pool``
    unlabelled images: image ``n + j`` is unlabelled image ``j``. Such an image's original
    mask is "not labelled" (all background): a saved mask makes it a training image,
    restore makes it unlabelled again."""

    def __init__(
        self,
        path: str | Path,
        content_hash: str,
        n: int,
        shape: tuple[int, int],
        readonly: bool = False,
        n_pool: int = 0,
    ) -> None:
        self.path = Path(path)
        self.n, self.shape, self.n_pool = n, tuple(shape), n_pool
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                self.db = sqlite3.connect(
                    uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False
                )
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(
                    self.path, timeout=30, isolation_level=None, check_same_thread=False
                )
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise CorrectionsError(f"{self.path}: cannot open the corrections database ({exc})") from None
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall()) if self._has_meta() else {}
        if not meta and not readonly:
            with self._tx():
                self.db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("dataset_hash", content_hash), ("n", str(n)), ("shape", f"{shape[0]}x{shape[1]}")],
                )
        elif meta.get("dataset_hash") != content_hash:
            raise CorrectionsError(
                f"{self.path}: these corrections belong to another dataset "
                f"(hash {meta.get('dataset_hash')}, this dataset {content_hash})"
            )

    @classmethod
    def for_dataset(
        cls, dataset: Dataset, path: str | Path | None = None, original_masks: np.ndarray | None = None
    ) -> CorrectionStore:
        masks = dataset.masks if original_masks is None else original_masks
        h = dataset_hash(dataset.images, masks)
        pool = 0 if dataset.test_images is None else len(dataset.test_images)
        return cls(path or default_store_path(dataset.source, h), h, len(masks), masks.shape[1:], n_pool=pool)

    def _has_meta(self) -> bool:
        return bool(self.db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone())

    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                store.db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def close(self) -> None:
        self.db.close()

    # -- writing ---------------------------------------------------------------
    def _check(self, image: int) -> int:
        image = int(image)
        if not 0 <= image < self.n + self.n_pool:
            raise IndexError(f"image {image} out of range 0..{self.n + self.n_pool - 1}")
        return image

    def _cursor(self, image: int) -> int | None:
        row = self.db.execute("SELECT entry FROM cursors WHERE image=?", (image,)).fetchone()
        return row[0] if row else None

    def _append(self, image: int, action: str, mask: np.ndarray | None = None, note: str = "") -> int:
        image = self._check(image)
        blob = None
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.shape != self.shape:
                raise ValueError(f"mask of image {image} is {mask.shape}; expected {self.shape}")
            if mask.max(initial=0) > 4:
                raise ValueError(f"mask of image {image} has class {int(mask.max())}; expected 0..4")
            blob = zlib.compress(mask.tobytes(), 6)
        with self._tx():
            parent = self._cursor(image)
            cur = self.db.execute(
                "INSERT INTO entries (image, parent, action, mask, time, note) VALUES (?, ?, ?, ?, ?, ?)",
                (image, parent, action, blob, time.time(), note),
            )
            entry = cur.lastrowid
            self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image, entry))
            self.db.execute(
                "INSERT INTO log (image, what, entry, time) VALUES (?, ?, ?, ?)",
                (image, action, entry, time.time()),
            )
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

    def undo(self, image: int) -> bool:
        """Step the image back to the previous state; False when there is nothing to undo."""
        image = self._check(image)
        with self._tx():
            cur = self._cursor(image)
            if cur is None:
                return False
            parent = self.db.execute("SELECT parent FROM entries WHERE id=?", (cur,)).fetchone()[0]
            self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image, parent))
            self.db.execute(
                "INSERT INTO log (image, what, entry, time) VALUES (?, 'undo', ?, ?)",
                (image, parent, time.time()),
            )
        return True

    def redo(self, image: int) -> bool:
        """Step forward along the newest branch; False when there is nothing to redo."""
        image = self._check(image)
        with self._tx():
            cur = self._cursor(image)
            if cur is None:
                row = self.db.execute(
                    "SELECT MAX(id) FROM entries WHERE image=? AND parent IS NULL", (image,)
                ).fetchone()
            else:
                row = self.db.execute(
                    "SELECT MAX(id) FROM entries WHERE image=? AND parent=?", (image, cur)
                ).fetchone()
            if row is None or row[0] is None:
                return False
            self.db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (image, row[0]))
            self.db.execute(
                "INSERT INTO log (image, what, entry, time) VALUES (?, 'redo', ?, ?)",
                (image, row[0], time.time()),
            )
        return True

    # -- reading ---------------------------------------------------------------
    def _chain(self, image: int) -> list[tuple]:
        """Entries from the image's cursor back to its first, newest first."""
        out = []
        entry = self._cursor(image)
        while entry is not None:
            row = self.db.execute(
                "SELECT id, parent, action, mask FROM entries WHERE id=?", (entry,)
            ).fetchone()
            out.append(row)
            entry = row[1]
        return out

    def state(self, image: int) -> tuple[np.ndarray | None, bool]:
        """(edited mask or None for the original, excluded?) of one image."""
        image = self._check(image)
        self.db.execute("BEGIN")  # one read transaction: a consistent view under WAL
        try:
            return self._state(image)
        finally:
            self.db.execute("COMMIT")

    def _state(self, image: int, with_mask: bool = True) -> tuple[np.ndarray | None, bool]:
        chain = self._chain(image)
        mask, excluded, mask_known, excl_known = None, False, False, False
        for _, _, action, blob in chain:
            if not mask_known and action in ("mask", "restore"):
                mask_known = True
                if action == "mask" and with_mask:
                    mask = np.frombuffer(zlib.decompress(blob), np.uint8).reshape(self.shape).copy()
            if not excl_known and action in ("exclude", "include"):
                excl_known, excluded = True, action == "exclude"
            if mask_known and excl_known:
                break
        return mask, excluded

    def effective_mask(self, image: int, original: np.ndarray) -> np.ndarray:
        mask, _ = self.state(image)
        return original if mask is None else mask

    def is_excluded(self, image: int) -> bool:
        return self.state(image)[1]

    def snapshot(self) -> tuple[dict[int, np.ndarray], set[int]]:
        """All edited masks and excluded images, read in one transaction."""
        edited, excluded = {}, set()
        self.db.execute("BEGIN")
        try:
            images = [r[0] for r in self.db.execute("SELECT image FROM cursors WHERE entry IS NOT NULL")]
            for i in images:
                mask, ex = self._state(i)
                if mask is not None:
                    edited[i] = mask
                if ex:
                    excluded.add(i)
        finally:
            self.db.execute("COMMIT")
        return edited, excluded

    def excluded(self) -> set[int]:
        """The excluded images, without decompressing any mask."""
        self.db.execute("BEGIN")
        try:
            images = [r[0] for r in self.db.execute("SELECT image FROM cursors WHERE entry IS NOT NULL")]
            return {i for i in images if self._state(i, with_mask=False)[1]}
        finally:
            self.db.execute("COMMIT")

    def version(self) -> int:
        """Changes whenever any image's state changes (for readers polling for news)."""
        row = self.db.execute("SELECT MAX(id) FROM log").fetchone()
        return int(row[0] or 0)

    def history(self, image: int) -> list[Entry]:
        image = self._check(image)
        cur = self._cursor(image)
        rows = self.db.execute(
            "SELECT id, image, parent, action, time, note FROM entries WHERE image=? ORDER BY id", (image,)
        ).fetchall()
        return [Entry(*r, current=r[0] == cur) for r in rows]

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
