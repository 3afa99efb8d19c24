"""fedlorm: federated class-incremental learning with LoRA and closed-form merges (LoRM)."""

__version__ = "0.1.0"
