"""Turn a trainer ``Dataset`` into napari layer data, and find it again in a viewer."""

from __future__ import annotations

from pathlib import Path

from napari.utils.colormaps import DirectLabelColormap

from trainer.classes import CLASSES
from trainer.dataset import Dataset

META_KEY = "marsviewer"


def class_colormap() -> DirectLabelColormap:
    """Fixed class colours. Background (0) stays transparent, napari's convention for 0,
    so the image shows through where nothing is labelled as terrain."""
    colors: dict = {c.id: c.rgba for c in CLASSES if c.id != 0}
    colors[0] = (0.0, 0.0, 0.0, 0.0)
    colors[None] = (0.0, 0.0, 0.0, 0.0)
    return DirectLabelColormap(color_dict=colors)


def dataset_label(dataset: Dataset) -> str:
    source = dataset.source
    if source.startswith("synthetic"):
        return "synthetic Mars"
    return Path(source).stem or source


def dataset_layer_data(dataset: Dataset) -> list[tuple]:
    """Layer-data tuples: the images as an Image layer, the masks as a Labels layer.

    Both layers carry the dataset's identity in their metadata so the main widget can
    adopt them however they were opened (its own buttons, File > Open, a sample).
    """
    label = dataset_label(dataset)
    meta = {"source": dataset.source, "names": list(dataset.names)}
    n_test = 0 if dataset.test_images is None else len(dataset.test_images)
    images = (
        dataset.images,
        {
            "name": f"{label} images",
            "metadata": {META_KEY: {**meta, "role": "images", "n_test": n_test}},
            "contrast_limits": (0, 255),
        },
        "image",
    )
    masks = (
        dataset.masks,
        {
            "name": f"{label} masks",
            "metadata": {META_KEY: {**meta, "role": "masks"}},
            "colormap": class_colormap(),
            "opacity": 0.45,
        },
        "labels",
    )
    return [images, masks]


def role_of(layer) -> str | None:
    info = getattr(layer, "metadata", {}).get(META_KEY)
    return info.get("role") if isinstance(info, dict) else None
