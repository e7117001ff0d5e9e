"""Where a dataset's corrections store lives, and the content hash that ties it to its dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def dataset_hash(images: np.ndarray, masks: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(masks).data)
    return h.hexdigest()


def _candidate_folders(source: str, content_hash: str) -> tuple[Path | None, Path]:
    """(beside the dataset, or None for synthetic data; in the user data folder by hash)."""
    from platformdirs import user_data_dir

    src = Path(source) if source and not source.startswith("synthetic") else None
    beside = None
    if src is not None and src.exists():
        beside = src.parent / (f"{src.stem}.marsviewer" if src.is_file() else f"{src.name}.marsviewer")
    return beside, Path(user_data_dir("marsviewer")) / "corrections" / content_hash


def existing_store_path(source: str, content_hash: str) -> Path | None:
    """Where this dataset's corrections already are, if anywhere (creates nothing)."""
    for folder in _candidate_folders(source, content_hash):
        if folder is not None and (folder / "corrections.sqlite").exists():
            return folder / "corrections.sqlite"
    return None


def default_store_path(source: str, content_hash: str) -> Path:
    """Beside the dataset if writable, else in the user data folder by content hash."""
    beside, fallback = _candidate_folders(source, content_hash)
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
