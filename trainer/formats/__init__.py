"""Dataset readers: the competition ``.npz``, image/mask folders and the synthetic sample."""

from __future__ import annotations

from pathlib import Path

from ..dataset import Dataset, DatasetError
from .folder import MASK_MAPPINGS, read_folder
from .npz import read_npz, write_npz

__all__ = ["MASK_MAPPINGS", "open_dataset", "read_folder", "read_npz", "write_npz"]


def open_dataset(
    path: str | Path,
    mask_mapping: str = "identity",
    size: tuple[int, int] | None = None,
) -> Dataset:
    """Open a dataset by what ``path`` is: a folder of image/mask pairs or an ``.npz``.

    ``synthetic`` or ``synthetic:N`` (optionally ``synthetic:N:SEED``) generates the
    built-in synthetic Mars sample instead of reading a file.
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
    if p.is_dir():
        return read_folder(p, mask_mapping=mask_mapping, size=size)
    return read_npz(p)
