"""The competition ``.npz`` format.

``training_set``: (N, 2, H, W), ``[:, 0]`` the image (0..255) and ``[:, 1]`` the mask
(0..4); ``test_set`` (optional): (M, H, W) images; ``classes`` (optional): the dataset's
own class table, a JSON string (``[{"id": 0, "name": "no label"}, {"id": 1, "name":
"Rock", "color": "#dc323c"}]``) beside the arrays; without it, the competition's table. The real file stores float64 and is
about 1 GB, so members are streamed out of the zip a few thousand images at a time and
converted to uint8 as they come: no float64 copy of the whole array is ever held.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classes import COMPETITION, ClassTable, ClassTableError
from ..dataset import Dataset, DatasetError, check_fits_in_memory, not_a_regular_file

TRAIN_KEY = "training_set"
TEST_KEY = "test_set"
CLASSES_KEY = "classes"
# About 32 MB of source values per chunk: big enough to be fast, small enough to be cheap.
_CHUNK_BYTES = 32 * 1024 * 1024


def _check_values(
    chunk: np.ndarray, path: Path, what: str, hi: int, first_index: int, classes: ClassTable | None = None
) -> None:
    """Refuse NaN, fractional or out-of-range values, naming the first bad image (and, for
    masks, the class table they are read with)."""

    def first_bad(bad: np.ndarray) -> int:
        per_image = bad.reshape(len(bad), -1).any(axis=1)
        return first_index + int(np.argmax(per_image))

    if chunk.dtype.kind == "f":
        finite = np.isfinite(chunk)
        if not finite.all():
            i = first_bad(~finite)
            raise DatasetError(
                f"{path}: {what} of image {i} contains NaN or infinite values; expected whole numbers 0..{hi}"
            )
        fractional = chunk != np.floor(chunk)
        if fractional.any():
            i = first_bad(fractional)
            value = chunk[fractional][0]
            raise DatasetError(
                f"{path}: {what} of image {i} has the value {float(value):g}, which is not a whole "
                f"number; expected whole numbers 0..{hi}"
            )
    lo_found, hi_found = chunk.min(), chunk.max()
    if lo_found < 0 or hi_found > hi:
        bad = (chunk < 0) | (chunk > hi)
        i = first_bad(bad)
        value = chunk[bad][0]
        value = value.item() if hasattr(value, "item") else value
        table = f" (the class ids of {classes.describe()})" if classes is not None else ""
        raise DatasetError(
            f"{path}: {what} of image {i} has the value {value:g}; expected whole numbers 0..{hi}{table}"
        )


def _size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def _read_header(f, path: Path, key: str, kinds: str = "biuf") -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DatasetError(f"{path}: member {key!r} is not a numpy array ({exc})") from None
    if dtype.kind not in kinds:
        if kinds == "U":
            raise DatasetError(f"{path}: {key!r} has dtype {dtype}; expected a JSON string (the class table)")
        raise DatasetError(f"{path}: {key!r} has dtype {dtype}; expected a numeric (integer or float) array")
    return tuple(shape), fortran, dtype


def _stream_member(
    zf: zipfile.ZipFile,
    path: Path,
    key: str,
    expect_ndim: int,
    expect_desc: str,
):
    """Yield (first_index, chunk) of a member, checked for shape, never fully in memory."""
    name = key + ".npy"
    with zf.open(name) as f:
        shape, fortran, dtype = _read_header(f, path, key)
        if len(shape) != expect_ndim or (expect_ndim == 4 and shape[1] != 2):
            raise DatasetError(f"{path}: {key!r} has shape {shape}; expected {expect_desc}")
        if shape[0] == 0 or 0 in shape:
            raise DatasetError(f"{path}: {key!r} is empty (shape {shape})")
        per_item = int(np.prod(shape[1:])) * dtype.itemsize
        # Check the declared size against what the member holds before anyone allocates
        # for it: a damaged or hand-made header may declare terabytes.
        held = zf.getinfo(name).file_size - f.tell()
        if per_item * shape[0] > held:
            raise DatasetError(
                f"{path}: {key!r} declares {shape[0]} images of {'x'.join(map(str, shape[1:]))} "
                f"{dtype} ({_size_text(per_item * shape[0])}) but the file holds {_size_text(max(held, 0))} "
                "of it; the file is damaged or truncated"
            )
        yield shape
        if fortran:
            # Rare (only from hand-written files): read whole, then it is C order.
            data = f.read()
            if len(data) != per_item * shape[0]:
                raise DatasetError(f"{path}: {key!r} is truncated")
            arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F")
            yield 0, np.ascontiguousarray(arr)
            return
        step = max(1, _CHUNK_BYTES // per_item)
        for start in range(0, shape[0], step):
            k = min(step, shape[0] - start)
            buf = f.read(k * per_item)
            if len(buf) != k * per_item:
                raise DatasetError(
                    f"{path}: {key!r} is truncated: the file ends after "
                    f"{start + len(buf) // per_item} of {shape[0]} images"
                )
            yield start, np.frombuffer(buf, dtype=dtype).reshape((k, *shape[1:]))


@dataclass
class NpzStream:
    """A competition npz read a chunk at a time: its sizes first, then ``chunks`` yields
    ``(first_row, images, masks)`` uint8 chunks, the training images (with masks) first,
    then the test images (masks None). Rows of test images follow the training rows."""

    path: Path
    n_train: int
    n_test: int
    shape: tuple[int, int]
    chunks: Iterator[tuple[int, np.ndarray, np.ndarray | None]]
    classes: ClassTable = COMPETITION


def _read_classes(zf: zipfile.ZipFile, path: Path) -> ClassTable:
    """The table declared in the ``classes`` member: a JSON string (a 0-d or 1-element
    string array, as ``np.savez(..., classes=json.dumps(table))`` writes it)."""
    where = f"{path}: its {CLASSES_KEY!r} array"
    with zf.open(CLASSES_KEY + ".npy") as f:
        shape, fortran, dtype = _read_header(f, path, CLASSES_KEY, kinds="U")
        if int(np.prod(shape)) != 1 or dtype.itemsize > 4 * 1_000_000:
            raise DatasetError(f"{where} should be one JSON string (the class table); it has shape {shape}")
        text = str(np.frombuffer(f.read(dtype.itemsize), dtype=dtype)[0])
    try:
        return ClassTable.from_json(text, where)
    except ClassTableError as exc:
        raise DatasetError(str(exc)) from None


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; expected an .npz file")
    why = not_a_regular_file(path)
    if why:
        raise DatasetError(f"{path}: {why}")
    if not zipfile.is_zipfile(path):
        raise DatasetError(
            f"{path}: not an npz file (an npz is a zip archive of .npy arrays); "
            "the file is either another format or truncated"
        )


@contextmanager
def _npz_errors(path: Path):
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated npz file ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: could not be read ({exc.strerror or exc})") from None


@contextmanager
def stream_npz(path: str | Path):
    """Open a competition npz for reading a chunk at a time (:class:`NpzStream`); every
    value is checked as it comes, and no more than a chunk (~32 MB of the file's values)
    is held. A context manager: the file stays open while the chunks are read."""
    path = Path(path)
    _check_file(path)
    with _npz_errors(path), zipfile.ZipFile(path) as zf:
        members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        if TRAIN_KEY not in members:
            found = ", ".join(sorted(members)) or "no arrays"
            raise DatasetError(
                f"{path}: missing key {TRAIN_KEY!r}; expected {TRAIN_KEY!r} "
                f"(N, 2, H, W) and optionally {TEST_KEY!r} (M, H, W), found: {found}"
            )
        classes = _read_classes(zf, path) if CLASSES_KEY in members else COMPETITION
        train = _stream_member(zf, path, TRAIN_KEY, 4, "(N, 2, H, W): image and mask")
        shape = next(train)
        test, tshape = None, (0,)
        if TEST_KEY in members:
            test = _stream_member(zf, path, TEST_KEY, 3, "(M, H, W) images")
            tshape = next(test)
            if tshape[1:] != shape[2:]:
                raise DatasetError(
                    f"{path}: {TEST_KEY!r} images are {tshape[1]}x{tshape[2]} but "
                    f"{TRAIN_KEY!r} images are {shape[2]}x{shape[3]}; expected the same size"
                )

        def chunks():
            with _npz_errors(path):
                for start, chunk in train:
                    img, msk = chunk[:, 0], chunk[:, 1]
                    _check_values(img, path, f"{TRAIN_KEY} image", 255, start)
                    _check_values(msk, path, f"{TRAIN_KEY} mask", len(classes) - 1, start, classes)
                    yield start, img.astype(np.uint8), msk.astype(np.uint8)
                for start, chunk in test or ():
                    _check_values(chunk, path, f"{TEST_KEY} image", 255, start)
                    yield shape[0] + start, chunk.astype(np.uint8), None

        yield NpzStream(path, shape[0], tshape[0], tuple(shape[2:]), chunks(), classes)


def read_npz(path: str | Path) -> Dataset:
    """Read a competition-format ``.npz`` (any file name) into a :class:`Dataset`.

    Any integer or float dtype is accepted when the values are whole numbers in range.

    Raises
    ------
    DatasetError
        If the file is missing, not an npz, truncated, lacks ``training_set``, or holds
        arrays of the wrong shape or values.
    """
    with stream_npz(path) as npz:
        n = npz.n_train
        check_fits_in_memory(path, 2 * n + npz.n_test, npz.shape)
        images = np.empty((n + npz.n_test, *npz.shape), np.uint8)
        masks = np.empty((n, *npz.shape), np.uint8)
        for start, img, msk in npz.chunks:
            images[start : start + len(img)] = img
            if msk is not None:
                masks[start : start + len(msk)] = msk
    test = images[n:] if npz.n_test else None
    return Dataset(
        images=images[:n], masks=masks, test_images=test, source=str(npz.path), classes=npz.classes
    )


def write_npz(
    path: str | Path,
    images: np.ndarray,
    masks: np.ndarray,
    test_images: np.ndarray | None = None,
    dtype: str = "float64",
    overwrite: bool = True,
    inputs: tuple = (),
    classes: ClassTable | None = None,
) -> None:
    """Write the competition format. ``dtype`` float64 mimics the real file. Written as
    every output is (:mod:`trainer.outputs`): under a partial name, renamed when complete;
    an existing file replaced only with ``overwrite``, never one of ``inputs``. A table of
    ``classes`` other than the competition's is written beside the arrays."""
    from ..outputs import written

    training = np.stack([images, masks], axis=1).astype(dtype)
    arrays = {TRAIN_KEY: training}
    if test_images is not None:
        arrays[TEST_KEY] = test_images.astype(dtype)
    if classes is not None and classes != COMPETITION:
        arrays[CLASSES_KEY] = np.array(classes.to_json())
    with written(path, inputs, overwrite) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
