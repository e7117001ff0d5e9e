"""Procedural synthetic Mars: grayscale rover-like terrain with masks and planted label problems.

The real competition data cannot be shipped, so this is the embedded default. Images are
rendered by projecting noise fields that live on a ground plane through a simple pinhole
camera, so textures shrink towards the horizon as in rover imagery:

* background: sky above the horizon, a hazy far-range band (beyond the labelling range)
  and, in some images, parts of the rover;
* soil: fine grain with scattered pebbles; bedrock: blocky slabs with dark cracks;
  sand: smooth with ripples; big rock (rare): lit on top, dark underneath, casting a shadow.

Class brightness ranges overlap, so texture, not grey level, tells the classes apart.
Label problems are planted and returned as ground truth:

* an outlier group: unrelated images ("aliens") that all share one identical mask;
* corrupted masks: a region relabelled, a wrong blob painted in, or the mask shifted.

Everything is vectorised over batches of images, deterministic from the seed, and a
batch's content does not depend on how many images are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .classes import COMPETITION, ClassTable, TerrainClass
from .dataset import Dataset

# Images are rendered in fixed batches of this many (the last one cut), so image i does
# not depend on how many images were asked for.
BATCH = 64
COMPETITION_IMAGES = 2615  # labelled images of the Mars competition's file
COMPETITION_TEST_IMAGES = 10022  # and its unlabelled test_set
BIG_ROCK_IMAGE_RATE = 0.03  # real data: 62 of 2615 images hold a big rock
OUTLIER_RATE = 110 / COMPETITION_IMAGES
CORRUPT_RATE = 0.04


@dataclass(frozen=True)
class Site:
    """Where the rover is: what differs from one landing site or traverse to another.
    The defaults are the built-in sample's."""

    terrain_mix: tuple[float, float, float] = (2.4, 1.7, 1.4)  # Dirichlet weights: soil, bedrock, sand
    rock_rate: float = BIG_ROCK_IMAGE_RATE  # share of images with big rocks
    brightness: float = 0.0  # added to the image (0..1 scale) before the camera's gamma
    contrast: float = 1.0  # scales the image around mid-grey
    texture_scale: float = 1.0  # finer (> 1) or coarser grain and ripples


DEFAULT_SITE = Site()


@dataclass
class SyntheticSample:
    """A generated dataset with its ground truth about planted label problems."""

    dataset: Dataset
    clean_masks: np.ndarray  # the masks before problems were planted
    truth: dict


def _value_noise(grids: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth periodic value noise: sample ``grids`` (B, g, g) at (u, v) grid units.

    ``g`` must be a power of two (wrapping is a bit mask). One flat ``take`` per corner
    is several times faster than fancy indexing with three index arrays.
    """
    n, g = grids.shape[0], grids.shape[-1]
    flat = grids.reshape(-1)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu = fu * fu * (3 - 2 * fu)  # smoothstep hides the grid
    fv = fv * fv * (3 - 2 * fv)
    iu0 = iu.astype(np.int32) & (g - 1)
    iu1 = (iu0 + 1) & (g - 1)
    base = (np.arange(n, dtype=np.int32) * (g * g))[:, None, None]
    iv0 = iv.astype(np.int32) & (g - 1)
    row0 = base + iv0 * g
    row1 = base + ((iv0 + 1) & (g - 1)) * g
    top = flat.take(row0 + iu0) * (1 - fu) + flat.take(row0 + iu1) * fu
    bottom = flat.take(row1 + iu0) * (1 - fu) + flat.take(row1 + iu1) * fu
    return top * (1 - fv) + bottom * fv


def _noise(rng, n, u, v, freq, grid=16):
    return _value_noise(rng.random((n, grid, grid), dtype=np.float32), u * freq, v * freq)


def _smooth_noise(rng, n, u, v, freq, grid=16):
    """Low-frequency noise, sampled at half resolution and repeated: 4x cheaper."""
    half = _noise(rng, n, u[:, ::2, ::2], v[:, ::2, ::2], freq, grid)
    return half.repeat(2, axis=1).repeat(2, axis=2)[:, : u.shape[1], : u.shape[2]]


def _add_rocks(rng, img, mask, has_rock, horizon, fine, yy, xx) -> None:
    """Draw one or two big rocks (class 4) with shadows into the chosen images, in place."""
    h, w = img.shape[1:]
    for i in np.flatnonzero(has_rock):
        for _ in range(rng.integers(1, 3)):
            cy = rng.uniform(max(horizon[i, 0, 0] + 0.25, 0.45), 0.95) * h
            ry = rng.uniform(0.06, 0.16) * h * (cy / h + 0.2)
            rx = ry * rng.uniform(1.2, 2.2)
            cx = rng.uniform(rx, w - rx)
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            shadow = (((yy - cy - 0.5 * ry) / ry) ** 2 + ((xx - cx - 0.6 * rx) / rx) ** 2 < 1.1) & (d >= 1)
            img[i][shadow] *= 0.45
            rock = d < 1
            lit = 0.72 - 0.35 * (yy - (cy - ry)) / (2 * ry) + 0.06 * (fine[i] - 0.5)
            img[i] = np.where(rock, lit, img[i])
            mask[i][rock] = 4


def _add_rover_parts(rng, img, mask, rover, yy, xx) -> None:
    """Draw a piece of the rover (background, class 0) into the chosen images, in place."""
    h, w = img.shape[1:]
    for i in np.flatnonzero(rover):
        x0 = rng.uniform(0.0, 0.7) * w
        width = rng.uniform(0.15, 0.45) * w
        top = rng.uniform(0.65, 0.9) * h
        slope = rng.uniform(-0.4, 0.4)
        part = (xx >= x0) & (xx < x0 + width) & (yy > top + slope * (xx - x0))
        metal = rng.uniform(0.1, 0.9) + 0.15 * np.sin(xx / rng.uniform(2, 6))
        img[i] = np.where(part, metal, img[i])
        mask[i][part] = 0


def _render_batch(rng: np.random.Generator, n: int, h: int, w: int, site: Site = DEFAULT_SITE):
    """Render ``n`` Mars-like images and their masks at ``site``."""
    f32 = np.float32
    y = np.arange(h, dtype=f32)[None, :, None] / h
    x = np.arange(w, dtype=f32)[None, None, :] / w
    col = lambda a: a.astype(f32)[:, None, None]  # noqa: E731 - per-image scalar to (n,1,1)

    # Camera: horizon row (negative = looking down, no sky) and a slight roll.
    horizon = col(rng.uniform(-0.05, 0.42, n))
    roll = col(rng.normal(0, 0.05, n))
    rel = y - (horizon + roll * (x - 0.5))  # height below the horizon, in image heights
    below = rel > 0.0
    depth = 0.35 / np.maximum(rel, 1e-3)  # ground distance along the view
    max_range = col(rng.uniform(4.0, 9.0, n))
    far = depth > max_range
    depth = np.minimum(depth, max_range * 1.5)
    gu = (x - 0.5) * depth * 1.6 + col(rng.uniform(0, 100, n))  # ground coordinates
    gv = depth + col(rng.uniform(0, 100, n))

    # Terrain classes: the largest of three noise fields, biased per image.
    share = rng.dirichlet(list(site.terrain_mix), n).astype(f32)  # soil, bedrock, sand
    fields = np.stack(
        [_smooth_noise(rng, n, gu, gv, 0.6) + 0.25 * np.log(share[:, k])[:, None, None] for k in range(3)]
    )
    terrain = (np.argmax(fields, axis=0) + 1).astype(np.uint8)  # 1 soil, 2 bedrock, 3 sand

    # Textures. Base grey levels overlap between classes on purpose.
    base = {
        1: col(rng.uniform(0.35, 0.6, n)),
        2: col(rng.uniform(0.4, 0.7, n)),
        3: col(rng.uniform(0.38, 0.62, n)),
    }
    fine = _noise(rng, n, gu, gv, 24.0 * site.texture_scale, grid=64)
    soil = base[1] + 0.16 * (fine - 0.5) + 0.22 * (_noise(rng, n, gu, gv, 16.0, grid=64) > 0.88)
    slab = _smooth_noise(rng, n, gu, gv, 2.0)
    crack_field = _noise(rng, n, gu, gv, 3.0)
    cracks = np.abs(crack_field - 0.5) < 0.012
    bedrock = base[2] + 0.22 * (slab - 0.5) + 0.05 * (fine - 0.5) - 0.3 * cracks
    theta = col(rng.uniform(0, np.pi, n))
    ripple_freq = col(rng.uniform(14.0, 24.0, n)) * f32(site.texture_scale)
    warp = _smooth_noise(rng, n, gu, gv, 0.8)
    phase = (gu * np.cos(theta) + gv * np.sin(theta)) * ripple_freq + 3.0 * warp
    sand = base[3] + 0.1 * np.sin(phase) + 0.03 * (fine - 0.5)
    img = np.where(terrain == 1, soil, np.where(terrain == 2, bedrock, sand))
    mask = terrain.copy()

    # Big rocks: rare, lit from above, dark underneath, with a shadow on the ground.
    yy = np.arange(h, dtype=f32)[:, None]
    xx = np.arange(w, dtype=f32)[None, :]
    _add_rocks(rng, img, mask, rng.random(n) < site.rock_rate, horizon, fine, yy, xx)

    # Background: hazy far range, sky, rover parts.
    haze = col(rng.uniform(0.5, 0.75, n)) + 0.05 * (
        _smooth_noise(rng, n, gu * 0 + x * 40, gv * 0 + y * 10, 1.0) - 0.5
    )
    img = np.where(far, haze, img)
    sky = col(rng.uniform(0.45, 0.8, n)) - 0.25 * y + 0.02 * rng.standard_normal((n, h, w), dtype=f32)
    img = np.where(below, img, sky)
    mask[far | ~below] = 0
    _add_rover_parts(rng, img, mask, rng.random(n) < 0.18, yy, xx)

    # Illumination: sun from one side, gentle ground shading, vignette, gamma, noise.
    sun = col(rng.uniform(-0.25, 0.25, n)) * (x - 0.5)
    shading = 0.12 * (_smooth_noise(rng, n, gu, gv, 0.6) - 0.5) * below
    vignette = 0.1 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    img = img + sun + shading - vignette
    if site.contrast != 1.0 or site.brightness != 0.0:
        img = (img - 0.5) * f32(site.contrast) + f32(0.5 + site.brightness)
    img = np.clip(img, 0, 1) ** col(rng.uniform(0.8, 1.25, n))
    img = img + 0.025 * rng.standard_normal((n, h, w), dtype=f32)
    images = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, mask


def _render_aliens(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Unrelated pictures: circles, stripes and checkers that look nothing like Mars."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w), np.uint8)
    for i in range(n):
        img = np.full((h, w), rng.uniform(0.1, 0.9), np.float32)
        if rng.random() < 0.5:
            period = rng.uniform(4, 16)
            img += 0.3 * np.sign(np.sin(xx / period) * np.sin(yy / period))
        for _ in range(rng.integers(2, 6)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, h / 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1)
        img += 0.2 * np.sin(xx * rng.uniform(0.05, 0.5) + yy * rng.uniform(0.05, 0.5))
        out[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return out


def _corrupt(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.ndarray, str]:
    """Return a wrong version of ``mask`` that differs in at least ~8% of pixels."""
    h, w = mask.shape
    for _ in range(20):
        kind = rng.choice(["relabel", "blob", "shift"])
        bad = mask.copy()
        if kind == "relabel":
            present = [c for c in (1, 2, 3) if (mask == c).mean() > 0.1]
            if not present:
                continue
            src = rng.choice(present)
            bad[mask == src] = rng.choice([c for c in (1, 2, 3) if c != src])
        elif kind == "blob":
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx = rng.uniform(0.4, 0.9) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.2, 0.35) * h, rng.uniform(0.15, 0.3) * w
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            bad[blob] = rng.choice([0, 1, 2, 3])
        else:
            shift = int(rng.integers(10, 20)) * (1 if rng.random() < 0.5 else -1)
            bad = np.roll(mask, shift, axis=1)
        if (bad != mask).mean() >= 0.08:
            return bad, str(kind)
    # A mask of almost one class cannot be corrupted subtly: paint a wide band instead.
    bad = mask.copy()
    bad[h // 2 :] = 2 if mask[h // 2 :].mean() != 2 else 3
    return bad, "band"


# The label sets ``generate`` can write: the competition's five classes; the competition's
# table with only soil and big rocks labelled (bedrock and sand labelled soil), as rover
# frames labelled rock against soil are; a table of its own, ground against rock.
LABEL_SETS = ("competition", "soil-rock", "rocks")
ROCKS_TABLE = ClassTable(
    (TerrainClass(0, "no label", (40, 40, 48)), TerrainClass(1, "Ground", (214, 140, 69)),
     TerrainClass(2, "Rock", (220, 50, 60)))
)  # fmt: skip


def relabel(masks: np.ndarray, labels: str) -> tuple[np.ndarray, ClassTable]:
    """Masks of the competition's classes in the label set ``labels`` (:data:`LABEL_SETS`),
    with its table."""
    if labels == "competition":
        return masks, COMPETITION
    if labels == "soil-rock":
        return np.array([0, 1, 1, 1, 4], np.uint8)[masks], COMPETITION
    if labels == "rocks":
        return np.array([0, 1, 1, 1, 2], np.uint8)[masks], ROCKS_TABLE
    raise ValueError(f"unknown label set {labels!r}; valid: {', '.join(LABEL_SETS)}")


def generate(
    n_train: int = COMPETITION_IMAGES,
    n_test: int = 0,
    seed: int = 0,
    shape: tuple[int, int] = (64, 128),
    plant_problems: bool = True,
    site: Site = DEFAULT_SITE,
    labels: str = "competition",
) -> SyntheticSample:
    """Generate a synthetic Mars dataset.

    Parameters
    ----------
    n_train, n_test : int
        Numbers of labelled and unlabelled images.
    seed : int
        Everything is a pure function of the seed and the arguments.
    shape : (H, W)
        Image size; the competition's is 64x128.
    plant_problems : bool
        Plant an outlier group and corrupted masks (recorded in ``truth``).
    site : Site
        Terrain mix, rock density, lighting and texture scale (default: the sample's).
    labels : str
        The label set (:data:`LABEL_SETS`): the competition's five classes, only soil and
        big rocks of them, or a table of its own (ground and rock).
    """
    relabel(np.zeros(0, np.uint8), labels)  # an unknown label set is refused before any work
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train} and {n_test}")
    h, w = shape
    total = n_train + n_test
    images = np.empty((total, h, w), np.uint8)
    masks = np.empty((total, h, w), np.uint8)
    for k, start in enumerate(range(0, total, BATCH)):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        b = min(BATCH, total - start)
        batch_images, batch_masks = _render_batch(rng, BATCH, h, w, site)
        images[start : start + b], masks[start : start + b] = batch_images[:b], batch_masks[:b]
    train_images, clean = images[:n_train].copy(), masks[:n_train].copy()
    train_masks = clean.copy()
    truth: dict = {
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "outlier_group": [],
        "corrupted": [],
        "corruption_kinds": {},
    }
    if plant_problems and n_train >= 10:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(10**6,)))
        n_out = max(3, round(OUTLIER_RATE * n_train))
        n_bad = max(2, round(CORRUPT_RATE * n_train))
        picked = rng.permutation(n_train)[: n_out + n_bad]
        outliers, corrupted = np.sort(picked[:n_out]), np.sort(picked[n_out:])
        train_images[outliers] = _render_aliens(rng, n_out, h, w)
        shared_mask = _render_batch(rng, 1, h, w)[1][0]
        train_masks[outliers] = shared_mask
        for i in corrupted:
            train_masks[i], kind = _corrupt(rng, clean[i])
            truth["corruption_kinds"][str(int(i))] = kind
        truth["outlier_group"] = outliers.tolist()
        truth["corrupted"] = corrupted.tolist()
    train_masks, table = relabel(train_masks, labels)
    clean, _ = relabel(clean, labels)
    dataset = Dataset(
        images=train_images,
        masks=train_masks,
        test_images=images[n_train:].copy() if n_test else None,
        source=f"synthetic:{n_train}:{seed}",
        classes=table,
    )
    return SyntheticSample(dataset=dataset, clean_masks=clean, truth=truth)
