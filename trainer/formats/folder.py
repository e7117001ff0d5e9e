"""Folders of image/mask pairs (PNG, JPG, TIF), such as NASA JPL's AI4Mars.

Two layouts are recognised:

* sub-folders: images under a folder named ``images``/``image``/``imgs``/``edr`` and
  masks under ``masks``/``mask``/``labels``/``label``/``gt`` (at any depth);
* flat: ``name.jpg`` beside ``name_mask.png`` (also ``_label``, ``_labels``, ``_gt``).

Images and masks are matched by file stem; images without a mask are the unlabelled pool
(``Dataset.test_images``). RGB images become grayscale; masks keep their raw values and
go through a value mapping (identity, or the AI4Mars preset 0..3 -> 1..4 and 255 -> 0).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..classes import NUM_CLASSES
from ..dataset import Dataset, DatasetError
from ..images import IMAGE_SUFFIXES, read_image

IMAGE_DIRS = {"images", "image", "imgs", "img", "edr"}
MASK_DIRS = {"masks", "mask", "labels", "label", "gt", "annotations"}
MASK_STEM_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_gt", "_merged")


def _mapping_table(name: str) -> np.ndarray:
    """A 256-entry lookup table; 255 in the table marks a value that is not allowed."""
    lut = np.full(256, 255, np.uint8)
    if name == "identity":
        lut[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    elif name == "ai4mars":
        lut[0:4] = [1, 2, 3, 4]
        lut[255] = 0
    else:
        raise DatasetError(f"unknown mask mapping {name!r}; valid: identity, ai4mars")
    return lut


MASK_MAPPINGS = ("identity", "ai4mars")


def _mask_key(path: Path) -> str:
    stem = path.stem.lower()
    for suffix in MASK_STEM_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _find_pairs(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(labelled images, their masks, images without a mask)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(
            f"{root}: no images found; expected PNG/JPG/TIF images with masks, either in "
            "'images/' and 'masks/' sub-folders or as 'name.png' beside 'name_mask.png'"
        )

    def under(p: Path, names: set[str]) -> bool:
        return any(part.lower() in names for part in p.relative_to(root).parts[:-1])

    in_image_dirs = [p for p in files if under(p, IMAGE_DIRS)]
    in_mask_dirs = [p for p in files if under(p, MASK_DIRS)]
    if in_image_dirs or in_mask_dirs:
        images, masks = in_image_dirs, in_mask_dirs
    else:
        masks = [p for p in files if p.stem.lower().endswith(MASK_STEM_SUFFIXES)]
        mask_set = set(masks)
        images = [p for p in files if p not in mask_set]
    if not images:
        raise DatasetError(f"{root}: found {len(masks)} masks but no images")
    by_key = {}
    for m in masks:
        by_key.setdefault(_mask_key(m), m)
    labelled = [p for p in images if p.stem.lower() in by_key]
    unlabelled = [p for p in images if p.stem.lower() not in by_key]
    if masks and not labelled:
        shown = ", ".join(str(p.relative_to(root)) for p in masks[:3])
        raise DatasetError(
            f"{root}: none of the {len(masks)} masks ({shown}...) matches an image; expected a mask "
            "with its image's file stem (in a masks/ or labels/ folder, or named 'stem_mask.png')"
        )
    return labelled, [by_key[p.stem.lower()] for p in labelled], unlabelled


def _load_mask(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                arr = np.asarray(im.convert("RGB"))
                if not (arr[..., 0] == arr[..., 1]).all() or not (arr[..., 0] == arr[..., 2]).all():
                    raise DatasetError(f"{path}: mask is a colour image; expected one channel of class ids")
                return arr[..., 0].copy()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc})") from None
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D mask, found shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.max() > 255 or arr.min() < 0:
            raise DatasetError(f"{path}: mask values up to {arr.max()}; expected 0..255")
        arr = arr.astype(np.uint8)
    return arr


def _resize(arr: np.ndarray, size: tuple[int, int], *, is_mask: bool) -> np.ndarray:
    if arr.shape == size:
        return arr
    from skimage.transform import resize

    out = resize(
        arr,
        size,
        order=0 if is_mask else 1,
        preserve_range=True,
        anti_aliasing=not is_mask,
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_folder(
    root: str | Path,
    mask_mapping: str = "identity",
    size: tuple[int, int] | None = None,
) -> Dataset:
    """Read a folder of image/mask pairs.

    Parameters
    ----------
    root : path
        The folder.
    mask_mapping : {"identity", "ai4mars"}
        How mask values become class ids.
    size : (H, W), optional
        Resize everything to this size; by default the most common image size.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    lut = _mapping_table(mask_mapping)
    image_paths, mask_paths, pool_paths = _find_pairs(root)
    images = [read_image(p) for p in image_paths]
    pool = [read_image(p) for p in pool_paths]
    masks = []
    for ip, mp, img in zip(image_paths, mask_paths, images, strict=True):
        raw = _load_mask(mp)
        if raw.shape != img.shape:
            raise DatasetError(
                f"{mp}: mask is {raw.shape[0]}x{raw.shape[1]} but its image {ip.name} is "
                f"{img.shape[0]}x{img.shape[1]}; expected the same size"
            )
        mapped = lut[raw]
        if (mapped == 255).any():
            bad = sorted(set(np.unique(raw[mapped == 255]).tolist()))
            raise DatasetError(
                f"{mp}: mask values {bad[:8]} are not valid with the {mask_mapping!r} mapping; "
                + ("expected 0..4" if mask_mapping == "identity" else "expected 0..3 and 255 (AI4Mars)")
            )
        masks.append(mapped)
    if size is None:
        size = Counter(a.shape for a in images + pool).most_common(1)[0][0]

    def stack(arrays: list[np.ndarray], is_mask: bool) -> np.ndarray:
        return (
            np.stack([_resize(a, size, is_mask=is_mask) for a in arrays])
            if arrays
            else np.zeros((0, *size), np.uint8)
        )

    def names(paths: list[Path]) -> list[str]:
        return [str(p.relative_to(root).with_suffix("")) for p in paths]

    return Dataset(
        images=stack(images, False),
        masks=stack(masks, True),
        test_images=stack(pool, False) if pool else None,
        source=str(root),
        names=names(image_paths),
        test_names=names(pool_paths),
    )
