"""Reader for competition ``.npz`` files, converted ``.zarr`` datasets and image/mask folders."""

from __future__ import annotations

import zipfile
from pathlib import Path

from trainer.formats import is_zarr, open_dataset
from trainer.images import IMAGE_SUFFIXES

from ._layers import dataset_layer_data


def _is_competition_npz(path: Path) -> bool:
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return "training_set.npy" in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        # Claim broken .npz files too, so the user gets our message about what is wrong
        # instead of a generic "no reader found".
        return True


def _looks_like_image_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    for i, p in enumerate(path.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            return True
        if i > 5000:
            break
    return False


def get_reader(path):
    """Return a reader for a competition ``.npz``, a converted ``.zarr`` dataset or an
    image/mask folder, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if _is_competition_npz(p) or is_zarr(p) or _looks_like_image_folder(p):
        return read_dataset
    return None


def read_dataset(path) -> list[tuple]:
    """Read the dataset at ``path`` into an Image and a Labels layer.

    Errors raise ``DatasetError`` with a message for people; napari shows it as a
    notification and the viewer stays usable.
    """
    if isinstance(path, list):
        path = path[0]
    return dataset_layer_data(open_dataset(path, lazy=True))
