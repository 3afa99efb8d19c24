"""In-memory labelled image sets and the transforms the experiments need on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LabeledImages",
    "class_incremental_union",
    "per_class_subsample",
    "to_model_input",
]


@dataclass
class LabeledImages:
    """Images as uint8 (N, C, H, W) with C = 1 or 3, int64 labels (N,), and class names.

    ``name`` identifies the source dataset (used to prefix class names in a union).
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            shape = tuple(self.images.shape)
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {shape}")
        if self.images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {self.images.shape[1]}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(
            self.class_names
        ):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``), whether or not all are present."""
        return len(self.class_names)

    def subset(self, indices: Tensor | Sequence[int]) -> LabeledImages:
        """The samples at ``indices`` (in that order; or where a bool mask is True)."""
        idx = torch.as_tensor(indices)
        idx = torch.nonzero(idx).flatten() if idx.dtype == torch.bool else idx.to(torch.int64)
        return LabeledImages(self.images[idx], self.labels[idx], list(self.class_names), self.name)


def class_incremental_union(datasets: Sequence[LabeledImages]) -> LabeledImages:
    """Concatenate datasets with disjoint label ranges (2nd dataset's labels offset by the 1st's
    class count, ...), class names prefixed ``"<dataset name>:"``; image shapes must agree."""
    if not datasets:
        raise ValueError("class_incremental_union needs at least one dataset")
    shape = tuple(datasets[0].images.shape[1:])
    for d in datasets[1:]:
        if tuple(d.images.shape[1:]) != shape:
            raise ValueError(
                f"cannot unite {datasets[0].name!r} images {shape} with "
                f"{d.name!r} images {tuple(d.images.shape[1:])}: shapes (C, H, W) must agree"
            )
    labels, names, offset = [], [], 0
    for d in datasets:
        labels.append(d.labels + offset)
        names.extend(f"{d.name}:{c}" if d.name else c for c in d.class_names)
        offset += d.num_classes
    return LabeledImages(
        torch.cat([d.images for d in datasets]),
        torch.cat(labels),
        names,
        "+".join(d.name for d in datasets),
    )


def per_class_subsample(data: LabeledImages, per_class: int | None, seed: int) -> LabeledImages:
    """Keep ``per_class`` random samples of each class (all of a smaller class; None = everything),
    drawn with ``seed`` so every run and client picks the same ones; original order is kept."""
    if per_class is None:
        return data
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0 or None, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return data.subset(torch.sort(torch.cat(keep)).values)


def per_class_split(
    data: LabeledImages, per_class: int, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """(rest, held out): ``per_class`` random samples of each class held out (e.g. a validation set
    carved from the training data), drawn with ``seed``; both keep the original order."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.labels == c).flatten()
        if len(idx) <= per_class:
            raise ValueError(
                f"class {data.class_names[c]!r} has {len(idx)} training images; holding out "
                f"{per_class} would leave none to train on"
            )
        held.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return data.subset(torch.nonzero(~mask).flatten()), data.subset(torch.nonzero(mask).flatten())


def to_model_input(images_uint8: Tensor, size: int) -> Tensor:
    """uint8 (N, C, H, W) → float (N, 3, size, size) in [0, 1]: gray repeated to RGB, bilinear
    resize with antialiasing. No mean/std normalisation: the backbone does it."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"expected uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    x = images_uint8.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        x = x.clamp_(0.0, 1.0)  # weights are convex; this only guards float rounding
    return x.contiguous()
