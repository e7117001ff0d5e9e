"""Batched augmentation on the training device, and oversampling of rare classes.

Everything works on whole batches of tensors already on the device: one affine grid and
one ``grid_sample`` per batch instead of per-image Python loops, so augmentation adds a
few percent to a step rather than becoming the bottleneck.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .losses import IGNORE_INDEX


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (B, 1, H, W) float images in [0, 1] and (B, H, W) integer masks (uint8 or
    wider; returned in the same dtype).

    Geometric changes (horizontal flip, rotation, zoom, shift) move image and mask
    together; masks are resampled with nearest neighbour and pixels that come from
    outside the image are marked ``IGNORE_INDEX`` so the loss skips them. Photometric
    changes (brightness, contrast, gamma, Gaussian noise) touch the image only.
    Vertical flips are off: rover images have the sky on top.
    """
    b = images.shape[0]
    dev = images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return _uniform(generator, b, lo, hi)

    theta = affine_theta(b, images.shape[-2:], cfg, generator)
    grid = affine_grid(theta, images.shape[-2:])
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Shift labels by one so that 0 marks "outside the image" after zero padding. Nearest
    # sampling copies values, so the floats stay exact small integers; the mask keeps
    # its dtype (uint8 from the dataset: a quarter of the memory traffic of int64).
    shifted = masks[:, None].float().add_(1)
    m = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    m = m.sub_(1).masked_fill_(m < 0, IGNORE_INDEX).to(masks.dtype)
    if cfg.photometric > 0:
        s = cfg.photometric
        brightness = uniform(-0.1, 0.1).view(b, 1, 1, 1) * s
        contrast = (1 + uniform(-0.2, 0.2) * s).view(b, 1, 1, 1)
        gamma = torch.exp(uniform(-0.2, 0.2) * s).view(b, 1, 1, 1)
        mean = out.mean(dim=(2, 3), keepdim=True)
        out = ((out - mean) * contrast + mean + brightness).clamp(0, 1) ** gamma
        sigma = uniform(0, 0.03).view(b, 1, 1, 1) * s
        out = out + sigma * torch.randn(out.shape, generator=generator, device=dev)
        out = out.clamp(0, 1)
    return out, m


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, H, W), align_corners=False)`` by broadcasting: the
    library's version is a batched matmul with inner size 3, several times slower on CPUs."""
    h, w = size
    dev, dt = theta.device, theta.dtype
    xs = (torch.arange(w, device=dev, dtype=dt) * 2 + 1) / w - 1  # pixel centres in -1..1
    ys = (torch.arange(h, device=dev, dtype=dt) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs[None, None, None, :] + t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2]
    return grid.permute(0, 2, 3, 1)  # (B, H, W, 2): x then y


def _uniform(generator: torch.Generator, b: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(b, generator=generator, device=generator.device) * (hi - lo) + lo


def affine_theta(b: int, size: tuple[int, int], cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, 2, 3) matrices for ``affine_grid``: flip, rotation, zoom and shift drawn per image.

    ``affine_grid`` works in normalised coordinates (-1..1 on each axis), so a rotation
    written there shears a non-square image (on 64x128, 8 degrees tilts horizontal lines
    by 4 and vertical ones by 16). The rotation is made in pixel space instead:
    ``S R S^-1`` with ``S = diag(2/W, 2/H)``, which scales its off-diagonal terms by the
    aspect ratio.
    """
    h, w = size
    dev = generator.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return _uniform(generator, b, lo, hi)

    angle = uniform(-1, 1) * math.radians(cfg.max_rotation)
    scale = 1 + uniform(-1, 1) * cfg.max_scale
    tx, ty = uniform(-1, 1) * 2 * cfg.max_shift, uniform(-1, 1) * 2 * cfg.max_shift
    flip = (
        (torch.rand(b, generator=generator, device=dev) < 0.5)
        if cfg.hflip
        else torch.zeros(b, dtype=torch.bool, device=dev)
    )
    sx = torch.where(flip, -1.0, 1.0) / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    row_x = torch.stack([cos * sx, -sin * (h / w) / scale, tx], 1)
    row_y = torch.stack([sin * (w / h) * sx, cos / scale, ty], 1)
    return torch.stack([row_x, row_y], 1)


def oversampling_weights(presence: np.ndarray, power: float) -> np.ndarray:
    """Sampling weight per image: ``(1 / frequency of its rarest class)^power``.

    ``presence`` is (N, C) bool: does image i contain class c. Background is not
    considered. ``power`` 0 gives uniform sampling; 0.5 draws an image with a class seen
    in 2% of images about 5x as often as one with only common classes.
    """
    n = len(presence)
    if power <= 0 or n == 0:
        return np.full(n, 1.0 / max(n, 1))
    fg = presence[:, 1:]
    image_freq = fg.mean(axis=0).clip(1.0 / n, None)  # share of images containing each class
    rarity = (1.0 / image_freq) ** power  # (C-1,)
    w = np.where(fg, rarity[None, :], 0).max(axis=1)
    w[w == 0] = 1.0  # images with only background
    w = w / w.min()
    return w / w.sum()
