"""Single images as the model sees them: any file PIL reads, or any array napari holds,
becomes one (H, W) uint8 grayscale image by one rule, the rule training images follow.

* RGB(A) becomes luma with ITU-R 601 weights, exactly as PIL's ``convert("L")``;
* 16-bit, 32-bit and float images are stretched linearly from their minimum to their
  maximum onto 0..255 (a constant image becomes 0);
* other colour modes (palette, CMYK, ...) go through RGB first.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .dataset import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def stretch_to_u8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not hi > lo:
        return np.zeros(a.shape, np.uint8)
    return np.nan_to_num((a - lo) * (255 / (hi - lo))).round().astype(np.uint8)


def to_gray_u8(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 3) or (H, W, 4) of any numeric type -> (H, W) uint8."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            rgb = stretch_to_u8(rgb)
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        # PIL's integer formula: L = (R*19595 + G*38470 + B*7471 + 2**15) >> 16
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale or an RGB(A) image, found shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    return stretch_to_u8(arr)


MAX_PIXELS_VARIABLE = "MARSVIEWER_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 200_000_000  # 14142x14142: larger headers are refused unless allowed


def max_pixels() -> int | None:
    """The most pixels a frame may declare (None: no limit): ``MARSVIEWER_MAX_PIXELS``
    (0: no limit), else 200 megapixels. A header can declare far more pixels than the
    file holds, and decoding it would take the machine's memory."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(
            f"{MAX_PIXELS_VARIABLE}={text!r}: expected a whole number of pixels (0: no limit)"
        ) from None
    return None if value <= 0 else value


@contextmanager
def open_picture(path: str | Path, what: str = "image", decode: bool = True) -> Iterator:
    """A PIL image of the file at ``path``, turned upright as viewers show it (its EXIF
    orientation applied; ``decode=False``: the header only, as stored). Refused with a :class:`DatasetError` naming the file: a path
    that is not a regular file (a device or a pipe would be read forever), a header that
    declares more pixels than :func:`max_pixels`, a file PIL cannot read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise DatasetError(
            f"{path}: not a regular file (a device, a pipe or a folder); expected an {what} file"
        )
    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = None  # the limit is ours (above), with a way to lift it
    try:
        with Image.open(path) as im:
            pixels = im.width * im.height
            if limit is not None and pixels > limit:
                raise DatasetError(
                    f"{path}: its header declares {im.width}x{im.height} pixels ({pixels:,}), more than the "
                    f"{limit:,} allowed (a damaged or hostile file, or a very large frame); "
                    f"to read it on purpose set {MAX_PIXELS_VARIABLE}={pixels} (0: no limit)"
                )
            if not decode:
                yield im
                return
            im.load()
            upright = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
            upright.format = im.format  # exif_transpose returns a copy without it
            yield upright
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: {exc}; set {MAX_PIXELS_VARIABLE}=0 to read it on purpose") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable {what} ({exc})") from None


def upright_size(im) -> tuple[int, int]:
    """(height, width) of a PIL image as viewers show it (EXIF orientations 5-8 turn it)."""
    turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (im.width, im.height) if turned else (im.height, im.width)


def read_image(path: str | Path) -> np.ndarray:
    """One image file as (H, W) uint8; a ``DatasetError`` naming the file if it cannot be read."""
    path = Path(path)
    with open_picture(path) as im:
        if im.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F", "RGB", "RGBA", "1"):
            im = im.convert("RGB")
        arr = np.array(im)  # a writable copy
    try:
        return to_gray_u8(arr)
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None


def image_files(inputs: list[str | Path]) -> list[tuple[Path, Path]]:
    """(file, name relative to its input) for image files and folders of them (searched
    recursively, masks left out: files under a masks/labels folder or named ``*_mask``)."""
    from .formats.folder import MASK_DIRS, MASK_STEM_SUFFIXES

    out = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p
                for p in item.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.stem.lower().endswith(MASK_STEM_SUFFIXES)
                and not any(part.lower() in MASK_DIRS for part in p.relative_to(item).parts[:-1])
            )
            if not found:
                raise DatasetError(
                    f"{item}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            out.extend((p, p.relative_to(item)) for p in found)
        elif item.is_file():
            out.append((item, Path(item.name)))
        else:
            raise DatasetError(f"{item}: no such file or folder")
    return out
