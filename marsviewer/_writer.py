"""Writer for masks (Labels layers): ``.npz`` stacks, ``.png``/``.tif`` single masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    source = (meta.get("metadata") or {}).get(META_KEY, {}).get("source")
    if source and Path(source).exists() and Path(source).resolve() == out.resolve():
        raise ValueError(f"{out}: refusing to overwrite the original dataset; choose another name")
    suffix = out.suffix.lower()
    if suffix == ".npz":
        np.savez_compressed(out, masks=arr)
    elif suffix in (".png", ".tif", ".tiff"):
        if arr.ndim != 2:
            raise ValueError(
                f"{out}: a {suffix} file holds one mask, but the layer is {arr.shape}; "
                "save as .npz to keep the whole stack"
            )
        from PIL import Image

        Image.fromarray(arr).save(out)
    else:
        raise ValueError(f"{out}: unsupported extension; use .npz, .png or .tif")
    return [str(out)]
