"""``mars-trainer convert``: a folder, an npz or the synthetic sample -> a zarr dataset.

Folders are decoded by a pool of threads (PIL and zstd release the GIL), a window of a
few frames per thread at a time, and written in order as they come: memory holds a
window of frames, never the dataset. Frames keep their own size (the store pads them to
the largest and records each size).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .carry import Carried, carry_corrections
from .dataset import DatasetError
from .formats.folder import FolderIndex, FolderItem, folder_mapping, frame_size, index_folder, load_item
from .formats.zarr_dataset import is_zarr
from .formats.zarr_writer import ZarrWriter
from .mask_mapping import MaskMapping
from .outputs import check_output, dataset_inputs
from .store_location import DatasetHasher, content_identity, identity, move_aside_store


@dataclass
class ConvertReport:
    out: Path
    labelled: int
    unlabelled: int
    frame: tuple[int, int]
    sizes: int  # distinct frame sizes
    skipped: list[str] = field(default_factory=list)  # "file: why" of frames left out
    replaced_store: str | None = None  # where the corrections of a dataset replaced went
    carried: Carried | None = None  # the source's corrections, carried into the new store


def _ordered(func: Callable, items: list, workers: int) -> Iterator[tuple[object, object]]:
    """(item, result or the DatasetError) in order, at most 4 per worker in flight."""

    def safe(item):
        try:
            return func(item)
        except DatasetError as exc:
            return exc

    window = max(1, 4 * workers)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(items), window):
            part = items[start : start + window]
            yield from zip(part, pool.map(safe, part), strict=True)


def convert(
    src: str | Path,
    out: str | Path,
    mask_mapping: str = "identity",
    workers: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertReport:
    """Write ``src`` as a zarr dataset at ``out``. A frame that cannot be decoded stops
    the conversion (naming the file) unless ``skip_bad``, which leaves it out and lists
    it in the report; a stopped conversion leaves nothing under ``out``. The corrections
    store of a dataset it replaces is moved aside (``ConvertReport.replaced_store``); the
    corrections saved for ``src`` are carried into the new dataset's store (``.carried``)."""
    src, out = Path(src), Path(out)
    if workers is not None and workers < 1:
        raise DatasetError(f"--workers must be at least 1 (decoding threads), got {workers}")
    workers = workers or min(8, os.cpu_count() or 1)
    mapping = (
        folder_mapping(src, mask_mapping)
        if src.is_dir() and not is_zarr(src)
        else MaskMapping.parse(mask_mapping)
    )
    check_output(out, dataset_inputs(src), overwrite)
    if (str(src).startswith("synthetic") and not src.exists()) or (src.is_file() and not is_zarr(src)):
        report, ident = _convert_arrays(src, out, progress)
    elif is_zarr(src):
        raise DatasetError(f"{src}: is already a zarr dataset")
    else:
        report, ident = _convert_folder(index_folder(src), out, mapping, workers, skip_bad, progress), None
    report.replaced_store = move_aside_store(report.out)
    report.carried = carry_corrections(src, report.out, ident)
    return report


def write_store(out: Path, writer: ZarrWriter, fill: Callable[[ZarrWriter], tuple[list[str], int]]):
    """``fill`` the writer and finish it; on any failure nothing is left under ``out``
    (a full disk is said as such)."""
    try:
        names, n_labelled = fill(writer)
        return writer.finish(names, n_labelled)
    except OSError as exc:
        writer.abandon()
        full = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise DatasetError(
            f"{out}: could not be written{full}: {exc.strerror or exc}; nothing was left behind"
        ) from None
    except BaseException:
        writer.abandon()
        raise


def _convert_folder(index: FolderIndex, out: Path, mapping, workers, skip_bad, progress) -> ConvertReport:
    items: list[FolderItem] = index.labelled + index.unlabelled
    skipped: list[str] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for item, size in _ordered(lambda it: frame_size(it.image), items, workers):
        if isinstance(size, DatasetError):
            if not skip_bad:
                raise size
            skipped.append(str(size))
        else:
            sizes[item.image] = size
    items = [it for it in items if it.image in sizes]
    if not items:
        raise DatasetError(f"{index.root}: no readable images")
    frame = (max(h for h, _ in sizes.values()), max(w for _, w in sizes.values()))
    n_planned = sum(1 for it in items if it.mask is not None)
    attrs = {"source": str(index.root), "mask_mapping": mapping.spec}
    writer = ZarrWriter(out, n_planned, len(items), frame, attrs, mapping.classes)

    def fill(w: ZarrWriter):
        names, row, n_labelled = [], 0, 0
        for k, (item, result) in enumerate(_ordered(lambda it: load_item(it, mapping), items, workers)):
            if isinstance(result, DatasetError):
                if not skip_bad:
                    raise result
                skipped.append(str(result))
                continue
            image, mask = result
            w.add(row, image, mask)
            names.append(index.name(item))
            n_labelled += mask is not None
            row += 1
            if progress is not None:
                progress(k + 1, len(items))
        return names, n_labelled

    path = write_store(out, writer, fill)
    n = len(writer.sizes)
    return ConvertReport(path, writer.masks.shape[0], n - writer.masks.shape[0], frame,
                         len({tuple(s) for s in writer.sizes.tolist()}), skipped)  # fmt: skip


def _convert_arrays(src: Path, out: Path, progress) -> tuple[ConvertReport, dict]:
    """The report, and what ties the source's corrections store to it (:func:`identity`):
    its rows are the converted dataset's, in order."""
    if src.is_file():
        return _convert_npz(src, out, progress)
    from .formats import open_dataset

    ds = open_dataset(src)  # the synthetic sample: made in memory anyway
    images, masks = ds.stacked()
    n = len(ds)
    attrs = {"source": str(src), "mask_mapping": "identity"}
    writer = ZarrWriter(out, n, len(images), ds.image_shape, attrs, ds.classes)

    def fill(w: ZarrWriter):
        for i in range(len(images)):
            w.add(i, images[i], masks[i] if i < n else None)
            if progress is not None:
                progress(i + 1, len(images))
        return list(ds.names) + list(ds.test_names), n

    path = write_store(out, writer, fill)
    return ConvertReport(path, n, len(images) - n, ds.image_shape, 1), identity(ds)


def _convert_npz(src: Path, out: Path, progress) -> tuple[ConvertReport, dict]:
    """An npz streamed a chunk at a time into the store (the real file is float64, ~1 GB),
    hashed on the way as reading it into memory would (its corrections store is found by
    that hash); the hash holds the masks, a byte a pixel, until the end."""
    from .formats.npz import stream_npz

    with stream_npz(src) as npz:
        n, total = npz.n_train, npz.n_train + npz.n_test
        names, test_names = [str(i) for i in range(n)], [str(j) for j in range(npz.n_test)]
        attrs = {"source": str(src), "mask_mapping": "identity"}
        writer = ZarrWriter(out, n, total, npz.shape, attrs, npz.classes)
        hasher = DatasetHasher((n, *npz.shape))

        def fill(w: ZarrWriter):
            for start, images, masks in npz.chunks:
                if masks is not None:
                    hasher.add(images, masks)
                for k in range(len(images)):
                    w.add(start + k, images[k], None if masks is None else masks[k])
                if progress is not None:
                    progress(start + len(images), total)
            return names + test_names, n

        path = write_store(out, writer, fill)
    ident = content_identity(hasher.hexdigest(), npz.shape, names, test_names)
    return ConvertReport(path, n, total - n, npz.shape, 1), ident
