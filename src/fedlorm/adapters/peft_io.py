"""Export / import LoRA factors in peft's adapter format (``PeftModel.from_pretrained`` reads it).

Files: ``adapter_model.safetensors`` with ``<prefix><module>.lora_A.weight`` (r × d_in; conv:
r × C_in × 1 × 1) and ``<prefix><module>.lora_B.weight`` (d_out × r; conv: C_out × r × 1 × 1), and
``adapter_config.json`` with ``lora_alpha = scaling · r`` so that peft's ``alpha / r`` equals our
scaling. By default only the trainable factors are written. With ``deployed=True`` each layer's
whole update, the frozen one (the merged update of earlier tasks) included, becomes one LoRA of its
own rank (:func:`deployed_factors`), so peft applies exactly the model fedlorm evaluates.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlorm.adapters.lora import LoRAConv2d, LoRALayer

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_ranks",
    "deployed_factors",
    "export_peft",
    "import_peft",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _pattern_key(name: str) -> str:
    # peft looks patterns up with re.match(rf"(.*\.)?({key})$", module_name): a leading "^" and an
    # escaped name make the key match exactly this module and no module whose name ends with it.
    return "^" + re.escape(name)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _pattern_lookup(patterns: Mapping[str, float], name: str, default: float) -> float:
    for key, value in patterns.items():  # same rule as peft's get_pattern_key
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _identity_factors(total: Tensor) -> tuple[Tensor, Tensor]:
    """``total`` (d_out × d_in) as B A with rank min(d_out, d_in): one factor is ``total``, the
    other an identity, so B·(A·x) reproduces total·x exactly (products with 1 and 0 only)."""
    d_out, d_in = total.shape
    if d_in <= d_out:
        return total, torch.eye(d_in, dtype=total.dtype, device=total.device)
    return torch.eye(d_out, dtype=total.dtype, device=total.device), total


@torch.no_grad()
def deployed_factors(layer: LoRALayer) -> tuple[Tensor, Tensor, float]:
    """``(B, A, s)`` with ``s · B A`` = the layer's whole update, frozen + trainable, exactly.

    ``s`` is the layer's scaling (1.0 if that is 0, when only the frozen update counts). A frozen
    factor pair F = F_B F_A joins the trainable one side by side: B = [F_B / s, B], A = [F_A; A],
    without the rank-one terms that are zero. A dense frozen update, or a joint rank above
    min(d_out, d_in), is written as the identity factorisation of the total update / s (rank
    min(d_out, d_in); see :func:`_identity_factors`). A layer without any update keeps one zero
    rank-one term (peft needs r >= 1).

    Args:
        layer: The LoRA layer, with its frozen update (if any) set.

    Returns:
        ``(B, A, s)`` with ``s · B A`` equal to the layer's whole update.
    """
    s = layer.scaling if layer.scaling != 0 else 1.0
    trainable = layer.scaling / s
    B_parts, A_parts = [layer.lora_B.detach() * trainable], [layer.lora_A.detach()]
    if layer.fixed_A is not None and layer.fixed_B is not None:
        B_parts.insert(0, layer.fixed_B / s)
        A_parts.insert(0, layer.fixed_A)
    B, A = torch.cat(B_parts, dim=1), torch.cat(A_parts, dim=0)
    if layer.fixed_delta is not None:
        B, A = _identity_factors(layer.fixed_delta / s + B @ A)
        return B, A, s
    keep = (B != 0).any(dim=0) & (A != 0).any(dim=1)
    if not keep.any():
        return torch.zeros_like(B[:, :1]), torch.zeros_like(A[:1]), s
    B, A = B[:, keep], A[keep]
    if B.shape[1] > min(layer.out_features, layer.in_features):
        B, A = _identity_factors(B @ A)
    return B, A, s


def export_peft(
    layers: Mapping[str, LoRALayer],
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    prefix: str = "base_model.model.",
    deployed: bool = False,
) -> Path:
    """Write the factors of ``layers`` (name → layer, names relative to the model) to ``directory``.

    Writes ``adapter_model.safetensors`` and ``adapter_config.json``, which
    ``peft.PeftModel.from_pretrained`` loads. Ranks or scalings that differ from the most common
    (rank, scaling) go to peft's ``rank_pattern`` / ``alpha_pattern``.

    Args:
        layers: The LoRA layers, under their names in the model peft will wrap.
        directory: The folder to write to (created if missing).
        base_model_name_or_path: Recorded in the config, e.g. the timm architecture.
        prefix: Put before every weight key, as peft names them (default ``base_model.model.``).
        deployed: Write each layer's whole update, the frozen one included
            (:func:`deployed_factors`), instead of the trainable factors alone.

    Returns:
        ``directory``.

    Raises:
        ValueError: If ``layers`` is empty.
    """
    if not layers:
        raise ValueError("no LoRA layers to export")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors, settings = {}, {}
    for name, layer in layers.items():
        if deployed:
            B, A, scaling = deployed_factors(layer)
        else:
            B, A, scaling = layer.lora_B.detach(), layer.lora_A.detach(), layer.scaling
        rank = A.shape[0]
        settings[name] = (rank, _number(scaling * rank))
        if isinstance(layer, LoRAConv2d):
            A, B = A[:, :, None, None], B[:, :, None, None]
        tensors[f"{prefix}{name}.lora_A.weight"] = A.cpu().contiguous().clone()
        tensors[f"{prefix}{name}.lora_B.weight"] = B.cpu().contiguous().clone()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    r, alpha = Counter(settings.values()).most_common(1)[0][0]
    rank_pattern = {_pattern_key(n): s[0] for n, s in settings.items() if s[0] != r}
    alpha_pattern = {_pattern_key(n): s[1] for n, s in settings.items() if s[1] != alpha}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(layers),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory``, checked for the LoRA options we can apply."""
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ValueError(f"peft adapter file {config_path} does not exist")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{config_path}: peft_type is {found!r}, not 'LORA'")
    for option in ("use_dora", "fan_in_fan_out"):
        if config.get(option):
            raise ValueError(f"{config_path}: {option}=true is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported (need 'none')")
    return config


def adapter_ranks(directory: str | Path) -> dict[str, int]:
    """The rank of every module an adapter folder names (its ``target_modules``).

    Args:
        directory: A folder written by :func:`export_peft` (or by peft with explicit module names).

    Returns:
        Module name → rank, per-module ranks (``rank_pattern``) applied.

    Raises:
        ValueError: If the config is missing, unreadable or names no modules.
    """
    directory = Path(directory)
    config = _read_config(directory)
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or "r" not in config:
        raise ValueError(
            f"{directory / ADAPTER_CONFIG}: needs 'r' and 'target_modules' as a list of module names"
        )
    patterns = config.get("rank_pattern") or {}
    return {str(name): int(_pattern_lookup(patterns, str(name), config["r"])) for name in targets}


@torch.no_grad()
def import_peft(
    layers: Mapping[str, LoRALayer], directory: str | Path, *, prefix: str = "base_model.model."
) -> None:
    """Load factors and scaling (alpha / r) written by peft or :func:`export_peft` into ``layers``.

    Every layer must find both factors with its rank and shape; the file must hold no other LoRA
    weights. A frozen update set on a layer is left as it is.

    Args:
        layers: The LoRA layers to load into, under the names the adapter uses.
        directory: The adapter folder (``adapter_model.safetensors``, ``adapter_config.json``).
        prefix: What every weight key starts with (default ``base_model.model.``).

    Raises:
        ValueError: If a file is missing or unreadable, or the weights do not fit the layers;
            one line naming the problem.
    """
    directory = Path(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ValueError(f"peft adapter file {weights_path} does not exist")
    config = _read_config(directory)
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # safetensors' errors have no common base
        raise ValueError(f"cannot read {weights_path}: {' '.join(str(e).split())}") from None

    expected = {}
    for name, layer in layers.items():
        expected[f"{prefix}{name}.lora_A.weight"] = (layer, "A")
        expected[f"{prefix}{name}.lora_B.weight"] = (layer, "B")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not fit the layers: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )

    scalings = {}
    for name, layer in layers.items():
        r = int(_pattern_lookup(config.get("rank_pattern") or {}, name, config["r"]))
        alpha = _pattern_lookup(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        if r != layer.rank:
            raise ValueError(
                f"rank mismatch for {name!r}: adapter has r={r}, layer has {layer.rank}"
            )
        scalings[name] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    values = {}
    for key, (layer, factor) in expected.items():
        param = layer.lora_A if factor == "A" else layer.lora_B
        value = state[key]
        if isinstance(layer, LoRAConv2d) and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: adapter has {tuple(state[key].shape)}, "
                f"layer expects {tuple(param.shape)}"
            )
        values[key] = (param, value)
    for param, value in values.values():
        param.copy_(value)
    for name, layer in layers.items():
        layer.scaling = float(scalings[name])
