"""``mars-trainer export --out NAME.zarr``: a dataset with its corrections applied, written
as a converted dataset, a frame at a time.

Whatever the source (an npz, a folder, a zarr dataset too large for memory), the result
holds every frame at its own size under its own name: the labelled images with their
effective masks (corrected where a correction is in effect), then the unlabelled images
that were labelled since (they are training images now), then the images still
unlabelled. A folder read into memory (which resizes frames of other sizes to one) is
written as its files are, the corrections saved at the size read resized back to each
frame. Excluded images are dropped, or kept and excluded again in the new dataset's
own corrections store (so that napari and ``train`` leave them out as before, and
"include" brings one back); a store left under the output's name by an earlier dataset
is moved aside, not applied to the new images by name. Memory
holds a block of frames and the labels of newly labelled images, never the dataset; a
conversion that stops leaves nothing under the output's name (as ``convert``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classes import COMPETITION, ClassTable
from .dataset import DatasetError
from .formats.zarr_writer import ZarrWriter
from .store_location import move_aside_store, row_keys


@dataclass
class Frames:
    """The rows of a dataset as a corrections store numbers them (labelled images, then
    unlabelled ones), read one at a time from memory or from disk."""

    n: int  # labelled images
    keys: list[str]  # one per row; the exported names
    image: Callable[[int], np.ndarray]
    mask: Callable[[int], np.ndarray]  # labelled rows only
    shape: Callable[[int], tuple[int, int]]
    source: str
    classes: ClassTable = COMPETITION

    @classmethod
    def of(cls, dataset) -> Frames:
        if hasattr(dataset, "sizes"):  # a StoredDataset, read from disk
            sizes = dataset.sizes
            return cls(
                n=dataset.n_labelled,
                keys=row_keys(dataset.labelled_names, dataset.test_names),
                image=dataset.image,
                mask=dataset.mask,
                shape=lambda i: (int(sizes[i][0]), int(sizes[i][1])),
                source=dataset.source,
                classes=dataset.classes,
            )
        n, pool = len(dataset), dataset.test_images

        def image(i: int) -> np.ndarray:
            return dataset.images[i] if i < n else pool[i - n]

        return cls(
            n=n,
            keys=row_keys(dataset.names, dataset.test_names),
            image=image,
            mask=lambda i: dataset.masks[i],
            shape=lambda i: tuple(dataset.image_shape),
            source=dataset.source,
            classes=dataset.classes,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def at_own_sizes(self, mask_mapping: str) -> Frames:
        """For a folder read into memory, which resizes frames of other sizes to one: the
        same rows, each frame whose file is of another size read again from disk at its
        own (a frame at a time; sizes from the files' headers). Other sources, and a
        folder of one size, are returned as they are."""
        from .formats import is_zarr
        from .formats.folder import folder_mapping, frame_size, index_folder, load_item

        root = Path(self.source)
        if not root.is_dir() or is_zarr(root):
            return self
        index = index_folder(root)
        items = index.labelled + index.unlabelled
        if [index.name(it) for it in items] != self.keys:
            raise DatasetError(f"{root}: its files changed while it was being exported; export again")
        sizes = [frame_size(it.image) for it in items]
        if all(sizes[i] == self.shape(i) for i in range(len(items))):
            return self
        mapping = folder_mapping(root, mask_mapping)
        load = functools.lru_cache(maxsize=1)(lambda i: load_item(items[i], mapping))

        def pick(memory: Callable[[int], np.ndarray], part: int) -> Callable[[int], np.ndarray]:
            return lambda i: memory(i) if sizes[i] == self.shape(i) else load(i)[part]

        return Frames(
            self.n,
            self.keys,
            pick(self.image, 0),
            pick(self.mask, 1),
            sizes.__getitem__,
            self.source,
            self.classes,
        )


def history(store, i: int) -> list[dict]:
    """The changelog's account of one image's corrections."""
    return [
        {"action": e.action, "time": e.time, "note": e.note, "current": e.current} for e in store.history(i)
    ]


@dataclass
class _Plan:
    """The rows of an export, in the store's numbering, and what goes into them."""

    rows: list[int]  # labelled rows kept, newly labelled ones, then still unlabelled ones
    n_labelled: int
    labels: dict[int, np.ndarray]  # saved labels of unlabelled images
    edited: set[int]
    excluded: set[int]


def _plan(frames: Frames, store, drop_excluded: bool) -> _Plan:
    n = frames.n
    edited = store.edited() if store is not None else set()
    excluded = store.excluded() if store is not None else set()
    kept = [i for i in range(len(frames)) if not (drop_excluded and i in excluded)]
    # Labels of unlabelled images: read now (they decide the rows); a label saved for a
    # frame that has changed size since does not count (the store reports it as a misfit).
    labels = {i: m for i in kept if i >= n and i in edited and (m := store.state(i)[0]) is not None}
    rows = [i for i in kept if i < n] + sorted(labels) + [i for i in kept if i >= n and i not in labels]
    return _Plan(rows, sum(1 for i in kept if i < n) + len(labels), labels, edited, excluded)


def _fitted(mask: np.ndarray, shape: tuple[int, int], change: dict) -> np.ndarray:
    """A saved mask at the frame's own size: one saved on a folder read into memory at
    another size is resized back (nearest neighbour), and the change says from what."""
    from .formats.folder import resize

    if mask.shape == tuple(shape):
        return mask
    change["resized_from"] = list(mask.shape)
    return resize(mask, tuple(shape), is_mask=True)


def _effective_mask(frames: Frames, store, plan: _Plan, i: int, changes: list[dict]) -> np.ndarray | None:
    """Row ``i``'s mask as exported (None: unlabelled), noting any change in ``changes``."""
    if i >= frames.n:
        if i not in plan.labels:
            return None
        changes.append({"name": frames.keys[i], "action": "labelled", "history": history(store, i)})
        return _fitted(plan.labels[i], frames.shape(i), changes[-1])
    original = frames.mask(i)
    if i not in plan.edited or (saved := store.state(i)[0]) is None:
        return original
    change = {"name": frames.keys[i], "action": "mask", "history": history(store, i)}
    saved = _fitted(saved, original.shape, change)
    changes.append({**change, "changed_pixels": int((saved != original).sum())})
    return saved


def export_zarr(
    dataset,
    store,
    out: Path,
    mask_mapping: str = "identity",
    drop_excluded: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``dataset`` with the corrections of ``store`` (or None) applied as a zarr
    dataset at ``out``; returns the changelog (what was applied, image by image)."""
    from .convert import write_store

    frames = Frames.of(dataset).at_own_sizes(mask_mapping)
    plan = _plan(frames, store, drop_excluded)
    rows = plan.rows
    shapes = [frames.shape(i) for i in rows]
    frame = (max((s[0] for s in shapes), default=1), max((s[1] for s in shapes), default=1))
    attrs = {"source": frames.source, "mask_mapping": mask_mapping}
    if store is not None:
        attrs["corrections"] = str(store.path)
    changes: list[dict] = []

    def fill(w: ZarrWriter) -> tuple[list[str], int]:
        for row, i in enumerate(rows):
            w.add(row, frames.image(i), _effective_mask(frames, store, plan, i, changes))
            if progress is not None:
                progress(row + 1, len(rows))
        return [frames.keys[i] for i in rows], plan.n_labelled

    path = write_store(out, ZarrWriter(out, plan.n_labelled, len(rows), frame, attrs, frames.classes), fill)
    replaced = move_aside_store(path)
    carried = [frames.keys[i] for i in rows if i in plan.excluded]
    carried_to = _exclude_in_export(path, carried, frames.source) if carried else None
    changes += [
        {"name": frames.keys[i], "action": "excluded", "dropped": drop_excluded, "history": history(store, i)}
        for i in sorted(plan.excluded)
    ]
    return {
        "source": frames.source,
        "out": str(path),
        "corrections": str(store.path) if store is not None else None,
        "images": len(rows),
        "labelled": plan.n_labelled,
        "unlabelled": len(rows) - plan.n_labelled,
        "edited": sum(1 for c in changes if c["action"] == "mask"),
        "newly_labelled": len(plan.labels),
        "excluded": len(plan.excluded),
        "dropped_excluded": drop_excluded,
        # Where the kept excluded images are excluded again, and an earlier store moved to.
        "excluded_kept": len(carried),
        "exclusions_store": carried_to,
        "replaced_store": replaced,
        # Corrections of images the dataset no longer has: not exported, kept in the store.
        "orphans": store.orphans() if store is not None else [],
        "changes": changes,
    }


def _exclude_in_export(path: Path, names: list[str], source: str) -> str:
    """Exclude the images ``names`` in the exported dataset's own corrections store (made
    beside it, as napari and ``train`` look for it); returns the store's path."""
    from .corrections import CorrectionStore
    from .formats import open_zarr

    store = CorrectionStore.for_dataset(open_zarr(path))  # names and sizes: no frame is read
    try:
        row = {key: i for i, key in enumerate(store.keys)}
        store.exclude_many([row[name] for name in names], note=f"excluded in {source}")
        store.mark_carried()
        return str(store.path)
    finally:
        store.close()
