"""Where a dataset's corrections store lives, and how the store finds the dataset's
images again: by name for folders and zarr datasets (their files can be added to), by
position under a content hash for files that never change (npz, synthetic data)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DatasetHasher:
    """:func:`dataset_hash` of labelled images and masks that come a chunk at a time (a
    streamed npz): the images are hashed as they come and the masks (a byte a pixel)
    held until :meth:`hexdigest`, since the hash takes every image before any mask."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._h.update(str(tuple(int(v) for v in shape)).encode())
        self._masks: list[np.ndarray] = []

    def add(self, images: np.ndarray, masks: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(images).data)
        self._masks.append(masks)

    def hexdigest(self) -> str:
        """The hash of every chunk added (add none after it)."""
        for m in self._masks:
            self._h.update(np.ascontiguousarray(m).data)
        self._masks = []
        return self._h.hexdigest()


def dataset_hash(images: np.ndarray, masks: np.ndarray) -> str:
    h = DatasetHasher(images.shape)
    h.add(images, masks)
    return h.hexdigest()


def keyed_by_name(source: str) -> bool:
    """Folders and zarr datasets: images have names that stay theirs when others are added."""
    return bool(source) and not source.startswith("synthetic") and Path(source).is_dir()


def row_keys(names: Sequence[str], test_names: Sequence[str] = ()) -> list[str]:
    """One key per row of the store: the labelled images' names, then the unlabelled
    ones'. Where the two share names (an npz numbers both sets from 0), the unlabelled
    images' keys get an ``unlabelled/`` prefix."""
    keys = [str(n) for n in names] + [str(n) for n in test_names]
    if len(set(keys)) != len(keys):
        keys = [str(n) for n in names] + [f"unlabelled/{n}" for n in test_names]
    if len(set(keys)) != len(keys):
        seen, dup = set(), []
        for k in keys:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise ValueError(f"images share names ({', '.join(dup[:3])}): corrections could not tell them apart")
    return keys


def identity(dataset, original_masks: np.ndarray | None = None) -> dict:
    """What ties a store to ``dataset`` (a :class:`Dataset` or a
    :class:`~trainer.formats.StoredDataset`): the keyword arguments of
    :class:`~trainer.corrections.CorrectionStore` but its path. A zarr dataset on disk is not hashed (it may
    be tens of GB): it is keyed by name and its masks' shapes are read from its size table."""
    by_name = keyed_by_name(dataset.source)
    if hasattr(dataset, "sizes"):  # on disk: its names are all rows'
        keys = row_keys(dataset.labelled_names, dataset.test_names)
        shapes = [tuple(int(v) for v in s) for s in dataset.sizes]
        return dict(
            content_hash=None, n=dataset.n_labelled, shape=shapes,
            n_pool=dataset.n_unlabelled, keys=keys, by_name=True,
        )  # fmt: skip
    masks = dataset.masks if original_masks is None else original_masks
    return content_identity(
        dataset_hash(dataset.images, masks), masks.shape[1:], dataset.names, dataset.test_names, by_name
    )


def content_identity(content_hash: str, shape, names, test_names, by_name: bool = False) -> dict:
    """:func:`identity` of a dataset held (or streamed) whole: masks of one ``shape``, rows
    named ``names`` then ``test_names``."""
    return dict(
        content_hash=content_hash, n=len(names), shape=tuple(shape), n_pool=len(test_names),
        keys=row_keys(names, test_names), by_name=by_name,
    )  # fmt: skip


def location_key(source: str, content_hash: str | None) -> str:
    """The user-data folder's name for this dataset's store: the path of a named dataset
    (its content changes as images are added), else the content hash."""
    if keyed_by_name(source) or content_hash is None:
        return "path-" + hashlib.blake2b(str(Path(source).resolve()).encode(), digest_size=16).hexdigest()
    return content_hash


def _candidate_folders(source: str, key: str) -> tuple[Path | None, Path]:
    """(beside the dataset, or None for synthetic data; in the user data folder by key)."""
    from platformdirs import user_data_dir

    src = Path(source) if source and not source.startswith("synthetic") else None
    beside = None
    if src is not None and src.exists():
        beside = src.parent / (f"{src.stem}.marsviewer" if src.is_file() else f"{src.name}.marsviewer")
    return beside, Path(user_data_dir("marsviewer")) / "corrections" / key


def _check_readable_folder(folder: Path | None) -> None:
    """Refuse a dataset's corrections folder that is there but cannot be used: going on
    would start a new, empty store elsewhere and leave the person's corrections behind."""
    import os

    from .corrections_db import CorrectionsError

    if folder is None or not (folder.exists() or folder.is_symlink()):
        return
    problem = None
    if not folder.is_dir():
        problem = "is not a folder"
    elif not os.access(folder, os.R_OK | os.X_OK):
        problem = "cannot be read (no permission)"
    else:
        try:
            next(folder.iterdir(), None)
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
    if problem:
        raise CorrectionsError(
            f"{folder}: the corrections folder of this dataset {problem}; fix it, or move it aside to "
            "start without its corrections (--no-corrections ignores it)"
        )


def existing_store_path(source: str, content_hash: str | None) -> Path | None:
    """Where this dataset's corrections already are, if anywhere (creates nothing). A
    named dataset's store may also be where an older version put it, by content hash."""
    beside, fallback = _candidate_folders(source, location_key(source, content_hash))
    _check_readable_folder(beside)
    candidates = [beside, fallback]
    if content_hash is not None:
        candidates.append(_candidate_folders(source, content_hash)[1])
    for folder in candidates:
        if folder is not None and (folder / "corrections.sqlite").exists():
            return folder / "corrections.sqlite"
    return None


def default_store_path(source: str, content_hash: str | None) -> Path:
    """The existing store, else beside the dataset if writable, else the user data folder."""
    found = existing_store_path(source, content_hash)
    if found is not None:
        return found
    beside, fallback = _candidate_folders(source, location_key(source, content_hash))
    if beside is not None:
        try:
            beside.mkdir(exist_ok=True)
            probe = beside / ".write-test"
            probe.write_text("ok")
            probe.unlink()
            return beside / "corrections.sqlite"
        except OSError:
            pass
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback / "corrections.sqlite"


def holds_only_carried(store: Path) -> bool:
    """Whether the corrections store at ``store`` holds nothing but what was carried into
    it from another dataset's store (:meth:`~trainer.corrections.CorrectionStore.mark_carried`)
    and its folder nothing else: removing it loses nothing."""
    from .corrections_db import connect, only_carried

    own = {store.name, f"{store.name}-wal", f"{store.name}-shm"}
    if any(p.name not in own for p in store.parent.iterdir()):
        return False
    try:
        db = connect(store, readonly=True)
        try:
            return only_carried(db)
        finally:
            db.close()
    except sqlite3.Error:
        return False


def move_aside_store(dataset: str | Path) -> str | None:
    """Move the folder of a corrections store found for the dataset just written at
    ``dataset`` to a name of its own (``.replaced-TIME``): it belongs to a dataset written
    there earlier, and its corrections would find the new images by name. A store that
    holds only what an earlier export or conversion carried into it (all still in the
    store of the dataset it came from) is removed instead: writing again and again over
    one name leaves no pile of such folders. Returns where the store went, or None when
    there was none or it was removed."""
    store = existing_store_path(str(dataset), None)
    if store is None:
        return None
    folder = store.parent
    if holds_only_carried(store):
        shutil.rmtree(folder)
        return None
    return set_aside(folder)


def set_aside(folder: Path) -> str:
    """Rename a corrections folder to a name of its own (``NAME.replaced-TIME``), whole:
    nothing in it is deleted, and no store finds it by its old name. Returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target, k = folder.with_name(f"{folder.name}.replaced-{stamp}"), 1
    while target.exists():
        k += 1
        target = folder.with_name(f"{folder.name}.replaced-{stamp}-{k}")
    folder.rename(target)
    return str(target)
