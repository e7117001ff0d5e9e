"""Dataset readers: the competition ``.npz``, image/mask folders, converted zarr datasets
and the synthetic sample."""

from __future__ import annotations

from pathlib import Path

from ..dataset import Dataset, DatasetError
from .folder import MASK_MAPPINGS, read_folder
from .npz import read_npz, write_npz
from .zarr_dataset import IN_MEMORY_BYTES, StoredDataset, is_zarr, open_zarr

__all__ = [
    "MASK_MAPPINGS",
    "StoredDataset",
    "is_zarr",
    "open_dataset",
    "open_zarr",
    "read_folder",
    "read_npz",
    "write_npz",
]


def open_dataset(
    path: str | Path,
    mask_mapping: str = "identity",
    size: tuple[int, int] | None = None,
    lazy: bool = False,
) -> Dataset | StoredDataset:
    """Open a dataset by what ``path`` is: a folder of image/mask pairs, an ``.npz`` or a
    ``.zarr`` written by ``mars-trainer convert``.

    ``synthetic`` or ``synthetic:N`` (optionally ``synthetic:N:SEED``) generates the
    built-in synthetic Mars sample instead of reading a file.

    A zarr dataset whose frames share one size and which takes less than
    ``IN_MEMORY_BYTES`` is read into memory (a :class:`Dataset`); a larger one is returned
    as a lazy :class:`StoredDataset` when the caller can use one (``lazy``), and refused
    with a message otherwise.
    """
    text = str(path)
    if text.startswith("synthetic") and not Path(text).exists():
        from ..synth import generate

        parts = text.split(":")
        try:
            n = int(parts[1]) if len(parts) > 1 else 200
            seed = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise DatasetError(
                f"{text!r}: expected 'synthetic', 'synthetic:N' or 'synthetic:N:SEED'"
            ) from None
        return generate(n_train=n, n_test=0, seed=seed).dataset
    p = Path(path)
    if is_zarr(p):
        stored = open_zarr(p)
        if stored.uniform and stored.nbytes <= IN_MEMORY_BYTES:
            return stored.to_memory()
        if lazy:
            return stored
        why = "frames of several sizes" if not stored.uniform else f"{stored.nbytes / 1e9:.1f} GB"
        raise DatasetError(
            f"{p}: {why}; this command reads datasets into memory (up to {IN_MEMORY_BYTES / 1e9:.1f} GB "
            "of frames of one size). train, evaluate, stats, suggest, predict --out FOLDER (PNG masks) and "
            "export --out NAME.zarr read it from disk"
        )
    if p.is_dir():
        return read_folder(p, mask_mapping=mask_mapping, size=size)
    return read_npz(p)
