"""The class table of Mars terrain segmentation.

The ids match the competition data and NASA JPL's AI4Mars labels (shifted by one,
with AI4Mars' 255 "no label" mapped to background). Background is ignored by the
competition metric, which is the mean IoU over classes 1-4.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TerrainClass:
    """One segmentation class: its id in the masks, its name and a fixed colour."""

    id: int
    name: str
    color: tuple[int, int, int]

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)

    @property
    def rgba(self) -> tuple[float, float, float, float]:
        r, g, b = self.color
        return (r / 255, g / 255, b / 255, 1.0)


CLASSES: tuple[TerrainClass, ...] = (
    TerrainClass(0, "Background", (40, 40, 48)),
    TerrainClass(1, "Soil", (214, 140, 69)),
    TerrainClass(2, "Bedrock", (122, 92, 196)),
    TerrainClass(3, "Sand", (245, 215, 90)),
    TerrainClass(4, "Big Rock", (220, 50, 60)),
)
NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
BACKGROUND = 0
# The competition metric ignores background: mIoU is over these ids.
METRIC_CLASSES: tuple[int, ...] = (1, 2, 3, 4)
