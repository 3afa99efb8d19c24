"""What ``fedlorm predict`` and ``fedlorm evaluate`` compute with a saved model (:mod:`fedlorm.export`):
the top classes of image files, and class-IL accuracy on a dataset's test split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedlorm.config import RunConfig
from fedlorm.data import Preprocessing, open_rgb, squash_square
from fedlorm.export import SavedModel
from fedlorm.runtime.evaluation import predict_logits
from fedlorm.runtime.experiment import load_split

__all__ = ["Scores", "evaluate_saved", "predict_images", "read_image"]


@dataclass
class Scores:
    """Class-IL accuracy (%) of a saved model on ``images`` test images of ``classes`` known classes."""

    accuracy: float
    images: int
    classes: int
    datasets: list[str]


def read_image(path: str | Path, preprocessing: Preprocessing) -> Tensor:
    """The image file as uint8 RGB (1, 3, H, W), ready for the model's test-time transform.

    A non-square image is first made square as photo datasets are when they are stored: squashed
    to the storage size with ``photo_resize = squash``; else, with ``test_crop = resize``, it loses
    the margins of its longer side, so that the resize does not squash it.

    Args:
        path: An image file in any format PIL reads.
        preprocessing: The saved model's test-time transform (:func:`fedlorm.export.model_preprocessing`).

    Returns:
        A uint8 tensor (1, 3, H, W).

    Raises:
        ValueError: One line, if the file cannot be read as an image.
    """
    image = open_rgb(Path(path))
    w, h = image.size
    if preprocessing.photo_resize == "squash":
        image = squash_square(image, preprocessing.storage_size)
    elif preprocessing.test_crop == "resize" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def predict_images(saved: SavedModel, images: Sequence[Tensor], top: int) -> list[list[tuple[str, float]]]:
    """The most likely classes of each image.

    Args:
        saved: The model :func:`fedlorm.export.load_model` read.
        images: uint8 images as :func:`read_image` returns them; the model resizes or crops them.
        top: How many classes to give per image.

    Returns:
        Per image, its ``top`` (class name, probability) pairs, most likely first.
    """
    model = saved.model.eval()
    device = model.head.weight.device
    out = []
    for image in images:
        probabilities = model(image.to(device)).float().softmax(dim=1)[0].cpu()
        values, indices = probabilities.topk(min(top, probabilities.numel()))
        out.append([(saved.class_names[int(i)], float(v)) for v, i in zip(values, indices, strict=True)])
    return out


def evaluate_saved(saved: SavedModel, cfg: RunConfig) -> Scores:
    """Class-IL accuracy on the test split of ``cfg``'s datasets (``data.test_per_class`` per class,
    subsampled with ``cfg.seed`` as a run does), over the test images of classes the model knows.

    Dataset classes are matched to the model's by name.

    Args:
        saved: The model :func:`fedlorm.export.load_model` read.
        cfg: The data settings to evaluate on (the run's own, from ``model.json``, or a preset's).

    Returns:
        The accuracy (%) and how many images, classes and datasets it counts.

    Raises:
        ValueError: One line, if the data cannot be loaded or none of its classes is known to
            the model.
    """
    data = load_split(cfg, "test", cfg.data.test_per_class, size=saved.preprocessing.storage_size)
    position = {name: p for p, name in enumerate(saved.class_names)}
    lookup = torch.tensor([position.get(name, -1) for name in data.class_names], dtype=torch.int64)
    targets = lookup[data.labels]
    known = targets >= 0
    if not bool(known.any()):
        raise ValueError(
            f"none of the classes of {', '.join(cfg.data.datasets)} is known to the model "
            f"(it knows {', '.join(saved.class_names[:5])}, …); set data.datasets to the run's datasets"
        )
    logits = predict_logits(
        saved.model, data.images[known], cfg.train.eval_batch_size, cfg.train.precision
    )
    hits = logits.argmax(dim=1) == targets[known]
    return Scores(
        accuracy=100.0 * float(hits.float().mean()),
        images=int(known.sum()),
        classes=int(torch.unique(targets[known]).numel()),
        datasets=list(cfg.data.datasets),
    )
