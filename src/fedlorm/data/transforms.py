"""How stored uint8 images become model input: test-time resize/crop and seeded training augmentation.

Datasets stay uint8 in memory at :attr:`Preprocessing.storage_size`; every batch is converted on the
model's device. The transforms are torchvision's (``transforms.v2`` on tensors). torchvision draws
their random parameters from the global CPU generator and applies one draw to a whole batch, so
:meth:`Preprocessing.augment` applies the policy image by image inside a forked RNG seeded from the
caller's generator: the same run seed gives the same crops and flips, and nothing else's random
stream moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from .images import to_model_input

__all__ = ["AUGMENTATIONS", "Augmentation", "PhotoResize", "Preprocessing", "TestCrop"]

Augmentation = Literal["none", "flip", "random-resized-crop", "resize-random-crop"]
AUGMENTATIONS: tuple[Augmentation, ...] = ("none", "flip", "random-resized-crop", "resize-random-crop")
"""Training augmentation policies:

- ``flip``: horizontal flip only (the reference's Cars-196);
- ``random-resized-crop``: RandomResizedCrop(size, scale=(augment_scale, 1)) (+ flip): CIFAR-100,
  ImageNet-R (scale 0.08), ImageNet-A (0.05);
- ``resize-random-crop``: shorter side to size / crop_pct, RandomCrop(size) (+ flip): CUB-200.
"""

TestCrop = Literal["resize", "center-crop"]
PhotoResize = Literal["crop", "squash"]

_SEED_HIGH = 2**62


@dataclass(frozen=True)
class Preprocessing:
    """uint8 (N, C, H, W) images → float RGB in [0, 1] at ``size`` (normalisation is the backbone's).

    Test time: ``resize`` scales to ``size`` × ``size``; ``center-crop`` scales the shorter side to
    ``round(size / crop_pct)`` and keeps the centre ``size`` × ``size`` (Resize 256 → CenterCrop 224
    at crop_pct 0.875). Training: :meth:`augment` applies ``augmentation`` (``flip`` adds a
    horizontal flip to the crop policies). ``photo_resize`` says how photos were made square when
    stored (:func:`fedlorm.data.decode_images`), which decides :attr:`storage_size`.
    """

    size: int
    test_crop: TestCrop = "resize"
    crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    photo_resize: PhotoResize = "crop"
    augmentation: Augmentation = "none"
    augment_scale: float = 0.08
    flip: bool = True

    @property
    def storage_size(self) -> int:
        """Side length photo datasets are stored at: what the test-time crop is taken from (squashed
        photos are stored at ``size``, as the reference stores them, and enlarged per batch)."""
        return self.size if self.test_crop == "resize" or self.photo_resize == "squash" else self.resize_size

    @property
    def resize_size(self) -> int:
        """Shorter side before a centre (test) or random (training) crop of ``size``."""
        return round(self.size / self.crop_pct)

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented."""
        return self.augmentation != "none"

    def test_input(self, images: Tensor) -> Tensor:
        """The deterministic test-time transform of a uint8 batch (also used when not augmenting)."""
        if self.test_crop == "resize" and self.interpolation == "bilinear":
            return to_model_input(images, self.size)  # the historical path, bit for bit
        x = _to_float_rgb(images)
        if self.test_crop == "resize":
            x = v2.functional.resize(x, [self.size, self.size], self._mode(), antialias=True)
        else:
            x = v2.functional.resize(x, [self.resize_size], self._mode(), antialias=True)
            x = v2.functional.center_crop(x, [self.size, self.size])
        return x.clamp_(0.0, 1.0).contiguous()

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """A training batch: each image through the augmentation policy, drawn from ``generator``.

        One seed is drawn from ``generator`` per batch; without augmentation the batch gets the
        test-time transform and ``generator`` is not touched.
        """
        if not self.augments:
            return self.test_input(images)
        seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=generator))
        policy = self._policy
        x = _to_float_rgb(images)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            out = torch.stack([policy(image) for image in x])
        return out.clamp_(0.0, 1.0).contiguous()

    def _mode(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    @cached_property
    def _policy(self) -> Callable[[Tensor], Tensor]:
        """The policy's torchvision pipeline, built once (it holds no random state of its own)."""
        mode, size = self._mode(), [self.size, self.size]
        if self.augmentation == "flip":
            steps: list[Callable[[Tensor], Tensor]] = [v2.Resize(size, mode, antialias=True)]
        elif self.augmentation == "random-resized-crop":
            steps = [v2.RandomResizedCrop(size, scale=(self.augment_scale, 1.0), interpolation=mode,
                                          antialias=True)]
        else:
            steps = [v2.Resize(self.resize_size, mode, antialias=True), v2.RandomCrop(size)]
        if self.flip or self.augmentation == "flip":
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps)


def _to_float_rgb(images: Tensor) -> Tensor:
    """uint8 (N, 1 or 3, H, W) → float RGB in [0, 1] on the same device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    x = images.float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
