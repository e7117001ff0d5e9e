"""Turn a trainer ``Dataset`` into napari layer data, and find it again in a viewer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from trainer.classes import CLASSES
from trainer.corrections import row_keys
from trainer.dataset import DatasetError
from trainer.formats import StoredDataset

from ._stack import FrameStack

META_KEY = "marsviewer"
AXIS_LABELS = ("image", "y", "x")  # a dataset's layers: one frame per image


def class_colormap(classes=CLASSES) -> DirectLabelColormap:
    """The colours of the dataset's class table. 0 ("not labelled") stays transparent,
    napari's convention for 0, so the image shows through where nothing is labelled."""
    colors: dict = {c.id: c.rgba for c in classes if c.id != 0}
    colors[0] = (0.0, 0.0, 0.0, 0.0)
    colors[None] = (0.0, 0.0, 0.0, 0.0)
    return DirectLabelColormap(color_dict=colors)


def layer_classes(info: dict):
    """The class table a dataset layer's metadata carries (the competition's for a layer
    without one, or one whose table cannot be read)."""
    from trainer.classes import ClassTable, ClassTableError

    try:
        return ClassTable.from_records(info["classes"]) if info.get("classes") else CLASSES
    except ClassTableError:
        return CLASSES


def dataset_label(dataset) -> str:
    source = dataset.source
    if source.startswith("synthetic"):
        return "synthetic Mars"
    return Path(source).stem or source


def dataset_layer_data(dataset) -> list[tuple]:
    """Layer-data tuples: the images as an Image layer, the masks as a Labels layer.

    Both layers carry the dataset's identity in their metadata so the main widget can
    adopt them however they were opened (its own buttons, File > Open, a sample).
    A zarr dataset too large for memory (a :class:`~trainer.formats.StoredDataset`)
    becomes lazy layers: napari reads the frame on screen from disk, and the masks are a
    :class:`~marsviewer._stack.FrameStack` that holds only the frames painted on.
    """
    if isinstance(dataset, StoredDataset):
        return _stored_layer_data(dataset)
    n_test = 0 if dataset.test_images is None else len(dataset.test_images)
    if len(dataset) + n_test == 0:
        raise DatasetError(f"{dataset.source}: no images")
    images, masks = dataset.stacked()  # the unlabelled images after the labelled ones
    return _layer_tuples(dataset, images, masks, dataset.names, dataset.test_names, n_test)


class ShownFrames:
    """The frames of a dataset read from disk as the viewer reads them: a frame that
    cannot be read (a damaged chunk) is an error notification naming the frame and its
    file, once, and shows as an empty frame, so the viewer stays usable; the frame is
    never taken as data (training, prediction and export read the dataset itself)."""

    def __init__(self, frames, notify=None) -> None:
        self._frames = frames
        self._notify = notify or _show_error
        self._said: set[str] = set()

    def __getattr__(self, attr):
        return getattr(self._frames, attr)

    def __len__(self) -> int:
        return len(self._frames)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)

    def __getitem__(self, key):
        try:
            return self._frames[key]
        except DatasetError as exc:
            if str(exc) not in self._said:
                self._said.add(str(exc))
                self._notify(str(exc))
            shape = np.broadcast_to(np.zeros((), self._frames.dtype), self._frames.shape)[key].shape
            return np.zeros(shape, self._frames.dtype)


def _show_error(text: str) -> None:
    from napari.utils.notifications import show_error

    show_error(text)


def _stored_layer_data(stored: StoredDataset) -> list[tuple]:
    if not len(stored.names):
        raise DatasetError(f"{stored.source}: no images")
    masks = FrameStack(
        stored.images.shape,
        base=ShownFrames(stored.masks),
        sizes=stored.sizes,
        class_pixels=stored.class_pixels,
    )
    return _layer_tuples(
        stored, ShownFrames(stored.images), masks, stored.labelled_names, stored.test_names,
        stored.n_unlabelled, lazy=True,
    )  # fmt: skip


def _layer_tuples(dataset, images, masks, names, test_names, n_test: int, lazy: bool = False) -> list[tuple]:
    label = dataset_label(dataset)
    shown = list(names) + [f"unlabelled {name}" for name in test_names]
    keys = row_keys(names, test_names)  # how corrections find each image
    meta = {"source": dataset.source, "names": shown, "keys": keys, "lazy": lazy,
            "classes": dataset.classes.records()}  # fmt: skip
    axes = {"axis_labels": AXIS_LABELS}  # the slider says "image", not napari's "-3"
    images = (
        images,
        {
            "name": f"{label} images",
            "metadata": {META_KEY: {**meta, "role": "images", "n_test": n_test}},
            "contrast_limits": (0, 255),
            **axes,
        },
        "image",
    )
    masks = (
        masks,
        {
            "name": f"{label} masks",
            "metadata": {META_KEY: {**meta, "role": "masks"}},
            "colormap": class_colormap(dataset.classes),
            "features": class_features(dataset.classes),
            "opacity": 0.45,
            **axes,
        },
        "labels",
    )
    return [images, masks]


def role_of(layer) -> str | None:
    info = getattr(layer, "metadata", {}).get(META_KEY)
    return info.get("role") if isinstance(info, dict) else None


def ensure_layer(viewer, name: str, data, kind: str, keep_selected=None, **kwargs):
    """The layer called ``name`` showing ``data``: added if missing, given ``data`` if it
    shows another array (a new dataset). ``kind`` is "labels" or "image"; ``kwargs``
    apply when the layer is made. The layer ``keep_selected`` (the user's masks) stays the
    selected one and on top, so paint tools keep acting on it and its paint is seen."""
    layers = viewer.layers
    if name in layers and layers[name].data is not data:
        if layers[name].data.shape == np.shape(data):
            layers[name].data = data
        else:
            layers.remove(name)
    if name not in layers:
        getattr(viewer, f"add_{kind}")(data, name=name, **kwargs)
        if keep_selected is not None and keep_selected in layers:
            # below the user's masks: the layer being painted is never hidden under another
            layers.move(layers.index(name), layers.index(keep_selected))
            layers.selection.active = keep_selected
    return layers[name]


def class_features(classes=CLASSES) -> dict:
    """Labels-layer features naming each class of the dataset's table, so napari's status
    bar under the cursor says "sand", not "3"."""
    return {"index": [c.id for c in classes], "class": [c.name for c in classes]}
