"""Decode image files into one uint8 (N, 3, H, W) tensor, resized at load to a storage size.

Photo datasets (ImageNet-R/-A, CUB-200, Cars-196) have images of every size; they are stored in memory
as ``size`` × ``size`` uint8 RGB, made square one of two ways (``data.photo_resize``): ``crop``
resizes the shorter side to ``size`` (PIL bicubic, which filters with the downscale factor, so no
aliasing) and keeps the centre square, which keeps objects' aspect ratio and loses only the margins
of the longer side (the reference's Cars-196 preprocessing); ``squash`` resizes the whole photo to the
square (PIL bicubic), as the reference stores ImageNet-R, ImageNet-A and CUB-200. uint8 keeps the
memory at a quarter of float32: ImageNet-R's 30,000 images at 224 px take 4.5 GB instead of 18 GB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "DEFAULT_STORAGE_SIZE",
    "IMAGE_SUFFIXES",
    "PHOTO_RESIZES",
    "decode_images",
    "fit_square",
    "open_rgb",
    "squash_square",
]

log = logging.getLogger(__name__)

DEFAULT_STORAGE_SIZE = 224
"""Storage size of photo datasets when the caller gives none (the paper's ViT input size)."""

PHOTO_RESIZES = ("crop", "squash")
"""How :func:`decode_images` makes a photo square: centre crop after a shorter-side resize, or squash."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File name endings (lower case) that count as images when a folder is listed."""


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the centre ``size`` × ``size`` crop."""
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    if (w, h) == (size, size):
        return image
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def squash_square(image: Image.Image, size: int) -> Image.Image:
    """The whole image resized to ``size`` × ``size`` (bicubic), aspect ratio not kept: how the LoRM
    reference stores ImageNet-R, ImageNet-A and CUB-200 (``Resize((224, 224))`` at load)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def open_rgb(path: Path) -> Image.Image:
    """The image file at ``path`` as RGB; a one-line ValueError naming it if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {' '.join(str(e).split())}") from e


def decode_images(
    paths: Sequence[Path], size: int | None, workers: int | None = None, photo_resize: str = "crop"
) -> Tensor:
    """All ``paths`` as uint8 RGB (N, 3, S, S) with S = ``size`` (:func:`fit_square`, or
    :func:`squash_square` when ``photo_resize`` is ``squash``), or at the files' own size when
    ``size`` is None (then every file must have the same size).

    Decoding runs in ``workers`` threads (default: up to 8; PIL releases the GIL while decoding and
    resizing), each writing its image straight into the preallocated result.
    """
    if size is not None and size < 1:
        raise ValueError(f"storage size must be >= 1, got {size}")
    if photo_resize not in PHOTO_RESIZES:
        raise ValueError(f"photo_resize {photo_resize!r} is unknown; allowed: {', '.join(PHOTO_RESIZES)}")
    square = squash_square if photo_resize == "squash" else fit_square
    paths = [Path(p) for p in paths]
    if not paths:
        return torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8)
    first = open_rgb(paths[0])
    height, width = (size, size) if size is not None else (first.height, first.width)
    out = torch.empty(len(paths), 3, height, width, dtype=torch.uint8)

    def load(i: int) -> None:
        img = first if i == 0 else open_rgb(paths[i])
        if size is not None:
            img = square(img, size)
        elif img.size != (width, height):
            raise ValueError(
                f"{paths[i]} is {img.width}x{img.height}, but {paths[0]} is {width}x{height}: "
                "images kept at their own size must all share one size"
            )
        out[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)

    n_workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(load, range(len(paths))))
    log.info("decoded %d images to %s", len(paths), tuple(out.shape[1:]))
    return out
