"""File > Open Sample > Mars Viewer > Synthetic Mars."""

from __future__ import annotations

from trainer.synth import generate

from ._layers import dataset_layer_data

SAMPLE_IMAGES = 200
SAMPLE_UNLABELLED = 60  # a pool to label, as the competition file's test_set: every tab works
SAMPLE_SEED = 0


def sample_dataset():
    """The built-in synthetic Mars sample: 200 labelled images with planted label problems
    and 60 unlabelled ones (the labelled images are the same with or without them, so the
    corrections saved for the sample before it had a pool still find it)."""
    return generate(SAMPLE_IMAGES, SAMPLE_UNLABELLED, seed=SAMPLE_SEED).dataset


def synthetic_mars() -> list[tuple]:
    """File > Open Sample: :func:`sample_dataset` as layers."""
    return dataset_layer_data(sample_dataset())
