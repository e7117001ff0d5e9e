"""Writer for masks (Labels layers): ``.npz`` stacks, ``.png``/``.tif`` single masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.classes import CLASS_NAMES
from trainer.outputs import OutputError, dataset_inputs, written

from ._layers import META_KEY
from ._stack import MATERIALISE_BYTES, is_stack


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Save a Labels layer. Never overwrites the dataset the masks were read from."""
    out = Path(path)
    if is_stack(data) and data.nbytes > MATERIALISE_BYTES:
        raise ValueError(
            f"{out}: these masks are a dataset read from disk ({len(data)} frames); edits are saved "
            "as corrections beside it (Alt-S) and every command reads them from there"
        )
    arr = np.asarray(data)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{out}: label values {arr.min()}..{arr.max()} do not fit in 0..255")
    arr = arr.astype(np.uint8)
    info = (meta.get("metadata") or {}).get(META_KEY, {})
    source, classes = info.get("source"), info.get("classes")
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".png", ".tif", ".tiff"):
        raise ValueError(f"{out}: unsupported extension; use .npz, .png or .tif")
    if suffix != ".npz" and arr.ndim != 2:
        raise ValueError(
            f"{out}: a {suffix} file holds one mask, but the layer is {arr.shape}; "
            "save as .npz to keep the whole stack"
        )
    # napari's save dialog has asked before replacing a file; the dataset the masks came
    # from, its images and its corrections are never written, whatever was answered.
    try:
        with (
            written(out, dataset_inputs(source), overwrite=True, what="file name") as tmp,
            open(tmp, "wb") as f,
        ):
            if suffix == ".npz":  # with the dataset's class table, when it has one of its own
                own = classes and [c["name"] for c in classes] != list(CLASS_NAMES)
                extra = {"classes": np.array(json.dumps(classes))} if own else {}
                np.savez_compressed(f, masks=arr, **extra)
            else:
                from PIL import Image

                Image.fromarray(arr).save(f, format="PNG" if suffix == ".png" else "TIFF")
    except OutputError as exc:
        raise ValueError(str(exc)) from None
    return [str(out)]
