"""File > Open Sample > Mars Viewer > Synthetic Mars."""

from __future__ import annotations

from trainer.synth import generate

from ._layers import dataset_layer_data

SAMPLE_IMAGES = 200
SAMPLE_SEED = 0


def synthetic_mars() -> list[tuple]:
    """The built-in synthetic Mars sample: 200 labelled images with planted label problems."""
    return dataset_layer_data(generate(SAMPLE_IMAGES, 0, seed=SAMPLE_SEED).dataset)
