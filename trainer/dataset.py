"""The one in-memory dataset every reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .classes import COMPETITION, ClassTable


class DatasetError(ValueError):
    """A dataset could not be read. The message is meant for people: it names the
    file, what was expected and what was found."""


class FileWarning(UserWarning):
    """Something about a person's file they should know, said as one plain line (the
    CLI prints it as ``warning: ...``; napari shows it as a notification)."""


def _available_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this system
        return None


def check_fits_in_memory(source, frames: int, size, instead: str = "") -> None:
    """Refuse, before allocating, ``frames`` uint8 frames of ``size`` that would not fit
    in the memory there is (a MemoryError says only "out of memory"). ``instead``: what
    else the person can do, before the way that always works (converting)."""
    need = int(frames) * int(size[0]) * int(size[1])
    free = _available_memory()
    if free is not None and need > free:
        raise DatasetError(
            f"{source}: {frames} frames at {size[0]}x{size[1]} take {need / 1e9:.1f} GB, more than the "
            f"{free / 1e9:.1f} GB of memory available; {instead}convert it (mars-trainer convert) to read "
            "it from disk"
        )


def not_a_regular_file(path) -> str | None:
    """Why ``path`` cannot be read as a file (None: it can). A device such as /dev/zero
    would be read until memory runs out, and a pipe would wait forever."""
    import os
    import stat
    from pathlib import Path

    try:
        mode = os.stat(Path(path)).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a folder; expected a file"
    if not stat.S_ISREG(mode):
        return "not a regular file (a device or a pipe); expected a file"
    return None


@dataclass
class Dataset:
    """Grayscale images with their masks, held as uint8 arrays.

    Attributes
    ----------
    images : (N, H, W) uint8
        Training images, 0..255.
    masks : (N, H, W) uint8
        Masks with class ids 0..4, aligned with ``images``.
    test_images : (M, H, W) uint8 or None
        Unlabelled images (the competition's ``test_set``, a folder's images without
        masks), if any.
    source : str
        Where the data came from (a path, or ``"synthetic:seed=..."``).
    names : list of str
        One name per training image (file stems for folders, indices otherwise).
    test_names : list of str
        One name per unlabelled image, likewise.
    classes : ClassTable
        The ids the masks use, with their names and colours (the competition's five by
        default; a dataset may declare its own).
    """

    images: np.ndarray
    masks: np.ndarray
    test_images: np.ndarray | None = None
    source: str = ""
    names: list[str] = field(default_factory=list)
    test_names: list[str] = field(default_factory=list)
    classes: ClassTable = COMPETITION

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.masks.dtype != np.uint8:
            raise TypeError("Dataset arrays must be uint8")
        if self.images.ndim != 3 or self.images.shape != self.masks.shape:
            raise ValueError(
                f"images {self.images.shape} and masks {self.masks.shape} must both be (N, H, W)"
            )
        if self.test_images is not None and self.test_images.shape[1:] != self.images.shape[1:]:
            raise ValueError(
                f"test images are {self.test_images.shape[1:]}, training images {self.images.shape[1:]}"
            )
        if not isinstance(self.classes, ClassTable):
            self.classes = ClassTable(self.classes)
        if not self.names:
            self.names = [str(i) for i in range(len(self.images))]
        if not self.test_names and self.test_images is not None:
            self.test_names = [str(i) for i in range(len(self.test_images))]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, masks) of every image: the labelled ones, then the unlabelled ones with
        empty masks. Row ``n + j`` is unlabelled image ``j``, as the corrections store, the
        viewer and a training with corrections number them."""
        if self.test_images is None or not len(self.test_images):
            return self.images, self.masks
        return (
            np.concatenate([self.images, self.test_images]),
            np.concatenate([self.masks, np.zeros_like(self.test_images)]),
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)
