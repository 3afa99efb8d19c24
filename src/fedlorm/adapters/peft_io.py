"""Export / import LoRA factors in peft's adapter format (``PeftModel.from_pretrained`` reads it).

Files: ``adapter_model.safetensors`` with ``<prefix><module>.lora_A.weight`` (r × d_in; conv:
r × C_in × 1 × 1) and ``<prefix><module>.lora_B.weight`` (d_out × r; conv: C_out × r × 1 × 1), and
``adapter_config.json`` with ``lora_alpha = scaling · r`` so that peft's ``alpha / r`` equals our
scaling. Only the factors are written: ``fixed_delta`` (the merged update of earlier tasks) has no
place in peft's format; fold it into the base weights first if the export must carry it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlorm.adapters.lora import LoRAConv2d, LoRALayer

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "export_peft", "import_peft"]

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


def export_peft(
    layers: Mapping[str, LoRALayer],
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    prefix: str = "base_model.model.",
) -> Path:
    """Write the factors of ``layers`` (name → layer, names relative to the model) to ``directory``.

    Ranks or scalings that differ from the most common (rank, scaling) go to peft's
    ``rank_pattern`` / ``alpha_pattern``. Returns the directory.
    """
    if not layers:
        raise ValueError("no LoRA layers to export")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {}
    for name, layer in layers.items():
        A = layer.lora_A.detach()
        B = layer.lora_B.detach()
        if isinstance(layer, LoRAConv2d):
            A, B = A[:, :, None, None], B[:, :, None, None]
        tensors[f"{prefix}{name}.lora_A.weight"] = A.cpu().contiguous().clone()
        tensors[f"{prefix}{name}.lora_B.weight"] = B.cpu().contiguous().clone()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    settings = {
        name: (layer.rank, _number(layer.scaling * layer.rank)) for name, layer in layers.items()
    }
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


@torch.no_grad()
def import_peft(
    layers: Mapping[str, LoRALayer], directory: str | Path, *, prefix: str = "base_model.model."
) -> None:
    """Load factors and scaling (alpha / r) written by peft or :func:`export_peft` into ``layers``.

    Every layer must find both factors with its rank and shape; the file must hold no other LoRA
    weights. ``fixed_delta`` is left as it is.
    """
    directory = Path(directory)
    weights_path, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights_path, config_path):
        if not path.is_file():
            raise ValueError(f"peft adapter file {path} does not exist")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for option in ("use_dora", "fan_in_fan_out"):
        if config.get(option):
            raise ValueError(f"{config_path}: {option}=true is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={config['bias']!r} is not supported (need 'none')")
    state = load_file(str(weights_path))

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
