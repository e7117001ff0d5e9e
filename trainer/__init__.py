"""Headless Mars terrain segmentation: datasets, statistics and U-Net training.

Never imports Qt or napari, so it runs on servers, in notebooks and under torchrun.
"""

from .classes import CLASS_NAMES, CLASSES, COMPETITION, NUM_CLASSES, ClassTable, ClassTableError, TerrainClass
from .dataset import Dataset, DatasetError
from .formats import open_dataset, read_folder, read_npz

__all__ = [
    "CLASSES",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "COMPETITION",
    "ClassTable",
    "ClassTableError",
    "TerrainClass",
    "Dataset",
    "DatasetError",
    "open_dataset",
    "read_folder",
    "read_npz",
]
__version__ = "0.1.0"
