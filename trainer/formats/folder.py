"""Folders of image/mask pairs (PNG, JPG, TIF), such as NASA JPL's AI4Mars.

Layouts recognised:

* sub-folders: images under a folder named ``images``/``image``/``imgs``/``edr`` and
  masks under ``masks``/``mask``/``labels``/``label``/``gt`` (at any depth, any split
  folders beneath: AI4Mars' ``labels/train`` and ``labels/test/...``);
* flat: ``name.jpg`` beside ``name_mask.png`` (also ``_label``, ``_labels``, ``_gt``,
  ``_merged``);
* AI4Mars' rover masks (``mxy/``) and range masks (``rng-30m/``): their non-zero pixels
  (the rover itself, terrain beyond 30 m) become 0, "not labelled", in the frame's mask.
  ``NLB_..._MXY_...`` and ``NLB_..._RNG_...`` belong to the frame ``NLB_..._EDR_...``.

Images and masks are matched by file stem; images without a mask are the unlabelled pool
(``Dataset.test_images``). Images follow the rule of :mod:`trainer.images` (RGB -> luma,
16-bit and float stretched from their minimum to their maximum onto 0..255); masks go
through a :class:`~trainer.mask_mapping.MaskMapping` (values, colours, or a preset).

A folder declares its own classes in ``classes.toml`` at its top (a mapping file with a
``[classes]`` table, :mod:`trainer.mask_mapping`): read when no other mapping is given.

``read_folder`` reads everything into memory at one size (for small datasets);
``mars-trainer convert`` reads the same :class:`FolderIndex` item by item into a zarr
store at each frame's own size.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dataset import Dataset, DatasetError, FileWarning, check_fits_in_memory
from ..images import IMAGE_SUFFIXES, open_picture, read_image, upright_size
from ..mask_mapping import PRESETS, MaskMapping

IMAGE_DIRS = {"images", "image", "imgs", "img", "edr"}
MASK_DIRS = {"masks", "mask", "labels", "label", "gt", "annotations"}
MASK_STEM_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_gt", "_merged")
IGNORE_DIRS = ("mxy", "rng")  # AI4Mars rover masks and range masks (rng-30m)
MASK_MAPPINGS = PRESETS
CLASSES_FILE = "classes.toml"


def folder_mapping(root: str | Path, spec: str | MaskMapping | None) -> MaskMapping:
    """The mapping a folder is read with: ``spec``, or when none is given (or the default
    ``identity``) the folder's own ``classes.toml`` if it has one."""
    if isinstance(spec, MaskMapping):
        return spec
    own = Path(root) / CLASSES_FILE
    if (spec is None or str(spec).strip() in ("", "identity")) and own.is_file():
        return MaskMapping.parse(str(own))
    return MaskMapping.parse(spec)


def _mask_key(path: Path) -> str:
    stem = path.stem.lower()
    for suffix in MASK_STEM_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _ignore_key(path: Path) -> str:
    return path.stem.lower().replace("_mxy_", "_edr_").replace("_rng_", "_edr_")


@dataclass
class FolderItem:
    """One frame: its image file, its mask file (None: unlabelled) and the files whose
    non-zero pixels are to be ignored (AI4Mars rover and range masks)."""

    image: Path
    mask: Path | None = None
    ignore: list[Path] = field(default_factory=list)


@dataclass
class FolderIndex:
    root: Path
    labelled: list[FolderItem]
    unlabelled: list[FolderItem]

    def name(self, item: FolderItem) -> str:
        return str(item.image.relative_to(self.root).with_suffix(""))


def _walk(root: Path) -> list[Path]:
    """Every file under ``root``; a sub-folder that cannot be listed is an error naming
    it (skipped, a masks/ folder would turn every image into an unlabelled one)."""

    def refuse(exc: OSError) -> None:
        raise DatasetError(
            f"{exc.filename}: this folder cannot be read ({exc.strerror or exc}); fix its permissions"
        )

    found = []
    for folder, _, names in os.walk(root, onerror=refuse):
        found += [Path(folder) / n for n in names if (Path(folder) / n).is_file()]
    return found


def index_folder(root: str | Path) -> FolderIndex:
    """Find the frames of a folder without decoding any of them."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    files = sorted(p for p in _walk(root) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(
            f"{root}: no images found; expected PNG/JPG/TIF images with masks, either in "
            "'images/' and 'masks/' sub-folders or as 'name.png' beside 'name_mask.png'"
        )

    def dirs(p: Path) -> list[str]:
        return [part.lower() for part in p.relative_to(root).parts[:-1]]

    ignore_files = [p for p in files if any(d.startswith(IGNORE_DIRS) for d in dirs(p))]
    ignored = set(ignore_files)
    files = [p for p in files if p not in ignored]
    in_image_dirs = [p for p in files if IMAGE_DIRS & set(dirs(p))]
    in_mask_dirs = [p for p in files if MASK_DIRS & set(dirs(p))]
    if in_image_dirs or in_mask_dirs:
        images, masks = in_image_dirs, in_mask_dirs
    else:
        masks = [p for p in files if p.stem.lower().endswith(MASK_STEM_SUFFIXES)]
        mask_set = set(masks)
        images = [p for p in files if p not in mask_set]
    if not images:
        raise DatasetError(f"{root}: found {len(masks)} masks but no images")
    by_key: dict[str, Path] = {}
    for m in masks:
        by_key.setdefault(_mask_key(m), m)
    ignore_by_key: dict[str, list[Path]] = {}
    for p in ignore_files:
        ignore_by_key.setdefault(_ignore_key(p), []).append(p)
    labelled, unlabelled = [], []
    for p in images:
        key = p.stem.lower()
        item = FolderItem(p, by_key.get(key), ignore_by_key.get(key, []))
        (labelled if item.mask is not None else unlabelled).append(item)
    if masks and not labelled:
        shown = ", ".join(str(p.relative_to(root)) for p in masks[:3])
        raise DatasetError(
            f"{root}: none of the {len(masks)} masks ({shown}...) matches an image; expected a mask "
            "with its image's file stem (in a masks/ or labels/ folder, or named 'stem_mask.png')"
        )
    return FolderIndex(root, labelled, unlabelled)


@dataclass
class MaskFile:
    """A mask file's raw values and what they cannot say by themselves."""

    values: np.ndarray  # (H, W) integers (palette indices for a palette file), or (H, W, 3) RGB
    transparent: np.ndarray | None  # (H, W) bool: alpha 0, "not labelled"; None: no alpha
    lossy: bool  # JPEG: values near edges are not the ones drawn


def read_mask_file(path: Path, colours: bool = False) -> MaskFile:
    """A mask file as drawn, turned upright as its image is. A palette ('P') file gives
    its indices (label tools save class ids so; colours are not unique in a palette),
    unless the mapping is by ``colours``; alpha 0 means not labelled."""
    with open_picture(path, "mask") as im:
        mode = im.mode
        transparent = None
        if mode in ("RGBA", "LA", "PA") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
            transparent = np.asarray(im.convert("RGBA").getchannel("A")) == 0
        if mode in ("P", "PA") and not colours:
            arr = np.asarray(im.getchannel(0))
        elif mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            arr = np.asarray(im.convert("RGB"))
        elif mode == "LA":
            arr = np.asarray(im.getchannel(0))
        else:
            arr = np.asarray(im)
        lossy = im.format == "JPEG"
    if arr.ndim == 3 and arr.shape[-1] != 3 or arr.ndim not in (2, 3):
        raise DatasetError(f"{path}: expected a 2-D mask, found shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if transparent is not None and not transparent.any():
        transparent = None
    return MaskFile(arr, transparent, lossy)


def load_item(item: FolderItem, mapping: MaskMapping) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one frame: (image (H, W) uint8, mask (H, W) uint8 class ids or None)."""
    image = read_image(item.image)
    if item.mask is None:
        return image, None

    def same_size(arr: np.ndarray, path: Path, what: str) -> None:
        if arr.shape[:2] != image.shape:
            raise DatasetError(
                f"{path}: {what} is {arr.shape[0]}x{arr.shape[1]} but its image {item.image.name} is "
                f"{image.shape[0]}x{image.shape[1]}; expected the same size"
            )

    raw = read_mask_file(item.mask, colours=mapping.is_colour)
    same_size(raw.values, item.mask, "mask")
    if raw.lossy:
        mask, unknown = mapping.apply(raw.values, item.mask, lossy=True)
        warnings.warn(
            f"{item.mask}: a JPEG mask: its compression changes values near class edges; "
            f"{unknown} pixels were not a class value and are left unlabelled (others may have "
            "changed class unseen): save masks as PNG",
            LossyMaskWarning,
            stacklevel=2,
        )
    else:
        mask = mapping.apply(raw.values, item.mask)
    if raw.transparent is not None:
        mask = np.where(raw.transparent, 0, mask).astype(np.uint8)
    for path in item.ignore:
        ignore = read_mask_file(path).values
        same_size(ignore, path, "rover/range mask")
        mask = np.where(ignore.reshape(*image.shape, -1).any(-1), 0, mask).astype(np.uint8)
    return image, mask


class LossyMaskWarning(FileWarning):
    """A mask saved in a lossy format (JPEG): some pixels are not the class drawn."""


def frame_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file as it is shown (upright), from its header: no
    pixel is decoded."""
    with open_picture(path, decode=False) as im:
        return upright_size(im)


def resize(arr: np.ndarray, size: tuple[int, int], *, is_mask: bool) -> np.ndarray:
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
    mask_mapping: str | MaskMapping = "identity",
    size: tuple[int, int] | None = None,
) -> Dataset:
    """Read a folder of image/mask pairs into memory.

    Parameters
    ----------
    root : path
        The folder.
    mask_mapping : str or MaskMapping
        How mask values become class ids: a preset (identity, ai4mars), value or colour
        pairs, or a TOML file (see :mod:`trainer.mask_mapping`).
    size : (H, W), optional
        Resize everything to this size; by default the most common image size.
    """
    mapping = folder_mapping(root, mask_mapping)
    index = index_folder(root)
    loaded = [load_item(item, mapping) for item in index.labelled]
    images = [image for image, _ in loaded]
    masks = [mask for _, mask in loaded]
    pool = [read_image(item.image) for item in index.unlabelled]
    if size is None:
        size = Counter(a.shape for a in images + pool).most_common(1)[0][0]
    check_fits_in_memory(index.root, len(images) * 2 + len(pool), size, "give a smaller --size, or ")

    def stack(arrays: list[np.ndarray], is_mask: bool) -> np.ndarray:
        return (
            np.stack([resize(a, size, is_mask=is_mask) for a in arrays])
            if arrays
            else np.zeros((0, *size), np.uint8)
        )

    return Dataset(
        images=stack(images, False),
        masks=stack(masks, True),
        test_images=stack(pool, False) if pool else None,
        source=str(index.root),
        names=[index.name(i) for i in index.labelled],
        test_names=[index.name(i) for i in index.unlabelled],
        classes=mapping.classes,
    )
