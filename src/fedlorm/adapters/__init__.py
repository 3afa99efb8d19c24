"""LoRA layers, injection by module name, factor switching, input statistics, peft-format I/O."""

from fedlorm.adapters.inject import (
    VIT_TARGETS,
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    reset_lora,
    set_trainable_factor,
)
from fedlorm.adapters.lora import LoRAConv2d, LoRALayer, LoRALinear, check_pointwise_conv
from fedlorm.adapters.peft_io import export_peft, import_peft
from fedlorm.adapters.statistics import InputStatistics

__all__ = [
    "VIT_TARGETS",
    "InputStatistics",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "check_pointwise_conv",
    "export_peft",
    "import_peft",
    "inject_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "reset_lora",
    "set_trainable_factor",
]
