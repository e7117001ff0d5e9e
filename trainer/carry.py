"""The corrections saved for a dataset, carried into the corrections store of the zarr
dataset ``convert`` made of it, so the converted dataset opens with the same corrected
masks, exclusions and labels of unlabelled images, each a new entry whose note names the
source; the source's store keeps its own, history and all. A folder's store finds the
converted images by name; an npz's (or the synthetic sample's) by position under the
content hash the conversion computed, the rows being the same. The converted dataset's
masks stay the originals (``export --out NAME.zarr`` writes the corrected masks into the
dataset instead)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .corrections import CorrectionsError, CorrectionStore
from .store_location import existing_store_path, identity


@dataclass
class Carried:
    source_store: str  # the source's store
    store: str | None = None  # the converted dataset's, None when nothing was carried
    masks: int = 0  # saved masks carried (corrected, or labels of unlabelled images)
    excluded: int = 0
    not_carried: list[str] = field(default_factory=list)  # "name: why"


def carry_corrections(src: Path, converted: Path, ident: dict | None = None) -> Carried | None:
    """Carry the corrections saved for ``src`` into the store of ``converted`` (just
    written from it); None when ``src`` has no store. ``ident`` ties the source's store
    to it (:func:`~trainer.store_location.identity`, rows in the converted order); None
    for a folder, found by the converted dataset's names. A mask saved for a frame of
    another size (a folder read into memory resizes mixed sizes), corrections of images
    the conversion left out, and a store made for other content are listed in
    ``not_carried``, not carried."""
    from .formats import open_zarr

    found = existing_store_path(str(src), None if ident is None else ident["content_hash"])
    if found is None:
        return None
    dataset = open_zarr(converted)  # names and sizes: no frame is read
    result = Carried(str(found))
    try:
        source = CorrectionStore(found, readonly=True, **(ident or identity(dataset)))
    except CorrectionsError as exc:
        result.not_carried.append(f"(all): {exc}")
        return result
    target = None
    try:
        note = f"carried from {src.name}"
        for row in sorted(source.edited() | source.excluded()):
            mask, excluded = source.state(row)  # one at a time: frames can be large
            if mask is None and not excluded:
                continue  # a mask saved for a frame of another size (a misfit, below)
            if target is None:
                target = CorrectionStore.for_dataset(dataset)
            if mask is not None:
                target.save_mask(row, mask, note)
                result.masks += 1
            if excluded:
                target.exclude(row, note)
                result.excluded += 1
        result.not_carried += [f"{name}: not in {converted.name}" for name in source.orphans()]
        result.not_carried += [
            f"{name}: its saved mask is not the size of its frame (export --out NAME.zarr applies it, resized)"
            for name in sorted(source.misfits)
        ]
        if target is not None:
            target.mark_carried()  # all of it is still in the source's store
            result.store = str(target.path)
    finally:
        source.close()
        if target is not None:
            target.close()
    return result
