"""A folder's saved corrections, carried into the corrections store of the zarr dataset
``convert`` made of it. Both stores find images by name, so the converted dataset opens
with the same corrected masks, exclusions and labels of unlabelled images, each a new
entry whose note names the folder; the folder's store keeps its own, history and all.
The converted dataset's masks stay the folder's originals (``export --out NAME.zarr``
writes the corrected masks into the dataset instead)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .corrections import CorrectionsError, CorrectionStore
from .store_location import existing_store_path, identity


@dataclass
class Carried:
    source_store: str  # the folder's store
    store: str | None = None  # the converted dataset's, None when nothing was carried
    masks: int = 0  # saved masks carried (corrected, or labels of unlabelled images)
    excluded: int = 0
    not_carried: list[str] = field(default_factory=list)  # "name: why"


def carry_corrections(folder: Path, converted: Path) -> Carried | None:
    """Carry the corrections saved for ``folder`` into the store of ``converted`` (just
    written from it); None when the folder has no store. A mask saved for a frame of
    another size (a folder read into memory resizes mixed sizes) and corrections of
    images the conversion left out are listed in ``not_carried``, not carried."""
    from .formats import open_zarr

    found = existing_store_path(str(folder), None)
    if found is None:
        return None
    dataset = open_zarr(converted)  # names and sizes: no frame is read
    result = Carried(str(found))
    try:
        source = CorrectionStore(found, readonly=True, **identity(dataset))
    except CorrectionsError as exc:
        result.not_carried.append(f"(all): {exc}")
        return result
    target = None
    try:
        note = f"carried from {folder.name}"
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
            f"{name}: its saved mask is not the size of its frame" for name in sorted(source.misfits)
        ]
        if target is not None:
            target.mark_carried()  # all of it is still in the folder's store
            result.store = str(target.path)
    finally:
        source.close()
        if target is not None:
            target.close()
    return result
