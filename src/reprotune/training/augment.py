"""Augmentation on the device, a whole batch at a time: random crops with a padding mode, flips,
rotations and colour jitter on uint8 or float images, driven by one seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reprotune.data.splits import GREY, to_float

# What fills the pixels a crop or a rotation brings in from outside the image (`train.padding_mode`).
# reflect (mirror the pixels inside, edge not repeated: numpy's and airbench's crop padding) and edge
# (repeat the border) only show what the image has; mean fills each image with its own mean colour,
# zero with black, the old default, which draws borders data with a light background never has.
PADDING_MODES = ("reflect", "edge", "mean", "zero")


def augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator,
            part: tuple[int, int] = (0, 1), rotation: float = 0.0, jitter: float = 0.0,
            mode: str = "reflect") -> torch.Tensor:
    """A uint8 batch randomly cropped, flipped, rotated and colour-jittered on its device, returned as
    the models' float32 [0, 1] input.

    Crop (a window of the image padded by `padding` px, filled per `mode`) and flip move uint8
    pixels, a quarter of float32's bytes; rotation (uniform in +-`rotation` degrees, corners filled
    per `mode`) and jitter (strength `jitter`) need floats, so they follow the conversion. A setting
    of 0 draws nothing from `generator`: with rotation and jitter at 0, the draws, and so a whole
    run, are exactly those of crop and flip alone. `mode` draws nothing either.

    `part=(k, n)`: `images` is the k-th of n equal slices of a larger batch (one rank's share of a
    global batch). The random draws are made for the whole batch, so each slice gets exactly what it
    would get augmented as one batch, and every rank's generator stays in step.
    """
    n, c, h, w = images.shape
    device = images.device
    k, parts = part
    mine = slice(k * n, (k + 1) * n)
    fill = images.float().mean((2, 3), keepdim=True) if mode == "mean" else None  # (N, C, 1, 1), 0-255
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n * parts, 1), device=device, generator=generator)[mine]
        dx = torch.randint(0, 2 * padding + 1, (n * parts, 1), device=device, generator=generator)[mine]
        rows = dy - padding + torch.arange(h, device=device)  # (N, H): source rows, some outside [0, h)
        cols = dx - padding + torch.arange(w, device=device)  # (N, W)
        cropped = images[torch.arange(n, device=device)[:, None, None, None], torch.arange(c, device=device)[
            None, :, None, None], _source(rows, h, mode)[:, None, :, None], _source(cols, w, mode)[:, None, None, :]]
        if mode in ("zero", "mean"):  # one gather, then the window's outside filled
            inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
            outside = torch.zeros((), dtype=images.dtype, device=device) if fill is None \
                else fill.round().to(images.dtype)
            cropped = torch.where(inside, cropped, outside)
        images = cropped  # (N, C, H, W)
    if hflip:
        flip = torch.rand(n * parts, device=device, generator=generator)[mine] < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    x = to_float(images)
    if rotation:
        uniform = torch.rand(n * parts, device=device, generator=generator)[mine]  # (N,) in [0, 1)
        x = rotate(x, (2 * uniform - 1) * rotation, mode, None if fill is None else fill / 255)
    if jitter:
        uniform = torch.rand(n * parts, 3, device=device, generator=generator)[mine]  # (N, 3) in [0, 1)
        x = jitter_colours(x, 1 + (2 * uniform - 1) * jitter)
    return x


def _source(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Where each position of a padded window reads inside [0, size): mirrored for reflect,
    clamped to the border otherwise (zero and mean then overwrite what lies outside)."""
    if mode == "reflect":
        period = 2 * (size - 1)  # a mirror about both edges, the edge pixel not repeated
        index = index.remainder(period)
        index = torch.where(index >= size, period - index, index)
    return index.clamp(0, size - 1)


GRID_PADDING = {"reflect": "reflection", "edge": "border", "mean": "zeros", "zero": "zeros"}


def rotate(images: torch.Tensor, degrees: torch.Tensor, mode: str = "reflect",
           fill: torch.Tensor | None = None) -> torch.Tensor:
    """Float images (N, C, H, W) each turned `degrees[i]` anticlockwise about its centre (as
    torchvision's `rotate`): one bilinear `grid_sample` for the batch. Where no pixel lands, `mode`
    decides: mirrored (reflect), the nearest border pixel (edge), `fill` (N, C, 1, 1) for mean,
    or zeros."""
    n, _, h, w = images.shape
    angle = torch.deg2rad(degrees.to(images.dtype))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps each output position to where it samples the input, in [-1, 1] coordinates
    # (x right, y down): the inverse rotation, with h/w and w/h keeping a non-square image's angles.
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1),
                         torch.stack([sin * w / h, cos, zero], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)  # (N, H, W, 2)
    if mode == "mean" and fill is not None:  # zeros around (image - fill) are fill around the image
        return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=GRID_PADDING[mode], align_corners=False)


def jitter_colours(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Float RGB images (N, 3, H, W) in [0, 1] with brightness, contrast and saturation scaled by
    `factors` (N, 3), in that order, clamped to [0, 1] after each, as torchvision's ColorJitter
    does (it shuffles the order per call; a fixed one keeps the batch one op per adjustment)."""
    brightness, contrast, saturation = factors.T[:, :, None, None, None]  # each (N, 1, 1, 1)
    grey = torch.tensor(GREY, dtype=images.dtype, device=images.device)[:, None, None]  # (3, 1, 1)
    x = (images * brightness).clamp_(0, 1)
    mean = (x * grey).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (N, 1, 1, 1): mean luma
    x = torch.lerp(mean, x, contrast).clamp_(0, 1)
    luma = (x * grey).sum(1, keepdim=True)  # (N, 1, H, W)
    return torch.lerp(luma, x, saturation).clamp_(0, 1)

