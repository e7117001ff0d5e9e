"""marsviewer: a napari plugin to explore, correct and train on labeled Mars terrain imagery.

The widgets hold no ML logic: they call the headless ``trainer`` package and show its results.
"""

__version__ = "0.1.0"
