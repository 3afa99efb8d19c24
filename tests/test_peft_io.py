"""Export to / import from peft's adapter format; peft itself loads what we write."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from fedlorm.adapters import (
    VIT_TARGETS,
    LoRALayer,
    LoRALinear,
    export_peft,
    import_peft,
    inject_lora,
)
from fedlorm.adapters.peft_io import adapter_ranks

peft = pytest.importorskip("peft")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=5,
    )
    return model.eval()


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),  # 2: 1×1, stride 1
        nn.ReLU(),
        nn.Conv2d(16, 12, 1, stride=2),  # 4: 1×1, stride 2
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),  # 8: head
    ).eval()


def randomize(layers: dict[str, LoRALayer], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def peft_logits(base: nn.Module, directory, x: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    with torch.no_grad():
        return model(x)


def assert_same_factors(src: dict[str, LoRALayer], dst: dict[str, LoRALayer]) -> None:
    assert list(src) == list(dst)
    for name in src:
        assert torch.equal(dst[name].lora_A, src[name].lora_A), name
        assert torch.equal(dst[name].lora_B, src[name].lora_B), name
        assert dst[name].scaling == pytest.approx(src[name].scaling, rel=1e-12)


def test_vit_roundtrip_through_peft(tmp_path):
    model = tiny_vit()
    fresh = copy.deepcopy(model)
    layers = inject_lora(model, VIT_TARGETS, rank=2, scaling=0.75)
    randomize(layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, plain = model(x), fresh(x)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter does change the output

    out = export_peft(layers, tmp_path / "adapter", base_model_name_or_path="tiny-vit")
    assert out == tmp_path / "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 1.5
    assert config["target_modules"] == list(layers)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["base_model_name_or_path"] == "tiny-vit"
    state = load_file(out / "adapter_model.safetensors")
    assert state["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape == (2, 192)
    assert state["base_model.model.blocks.0.attn.qkv.lora_B.weight"].shape == (576, 2)
    assert len(state) == 2 * len(layers)

    torch.testing.assert_close(peft_logits(fresh, out, x), ours, rtol=1e-5, atol=1e-5)

    target = inject_lora(tiny_vit(), VIT_TARGETS, rank=2)
    import_peft(target, out)
    assert_same_factors(layers, target)


def test_cnn_with_strided_1x1_convs_through_peft(tmp_path):
    model = small_cnn()
    fresh = copy.deepcopy(model)
    layers = inject_lora(model, ["2", "4", "8"], rank=3, scaling=0.5)
    randomize(layers)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ours = model(x)
    assert not torch.allclose(ours, fresh(x), atol=1e-3)

    export_peft(layers, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert state["base_model.model.4.lora_A.weight"].shape == (3, 16, 1, 1)
    assert state["base_model.model.4.lora_B.weight"].shape == (12, 3, 1, 1)
    assert state["base_model.model.8.lora_A.weight"].shape == (3, 12)
    torch.testing.assert_close(peft_logits(fresh, tmp_path, x), ours, rtol=1e-5, atol=1e-5)

    target = inject_lora(small_cnn(), ["2", "4", "8"], rank=3)
    import_peft(target, tmp_path)
    assert_same_factors(layers, target)


def test_mixed_ranks_and_scalings_use_patterns(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
    ).eval()
    model = copy.deepcopy(plain)
    layers = {
        "0": LoRALinear(model[0], rank=2, scaling=0.5),
        "2": LoRALinear(model[2], rank=4, scaling=0.5),
        "4": LoRALinear(model[4], rank=2, scaling=2.0),
    }
    model[0], model[2], model[4] = layers["0"], layers["2"], layers["4"]
    randomize(layers)
    export_peft(layers, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 1)
    assert config["rank_pattern"] == {"^2": 4}
    assert config["alpha_pattern"] == {"^2": 2, "^4": 4}
    x = torch.randn(5, 6)
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(peft_logits(plain, tmp_path, x), ours, rtol=1e-5, atol=1e-5)

    target = {
        n: LoRALinear(nn.Linear(layer.in_features, layer.out_features), layer.rank)
        for n, layer in layers.items()
    }
    import_peft(target, tmp_path)
    assert_same_factors(layers, target)
    assert [t.scaling for t in target.values()] == [0.5, 0.5, 2.0]


def test_import_errors(tmp_path):
    model = small_cnn()
    layers = inject_lora(model, ["2", "4"], rank=3)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not exist"):
        import_peft(layers, tmp_path / "nowhere")
    export_peft(layers, tmp_path)

    with pytest.raises(ValueError, match=r"rank mismatch for '2': adapter has r=3, layer has 2"):
        import_peft(inject_lora(small_cnn(), ["2", "4"], rank=2), tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \['base_model\.model\.8\.lora_A\.weight'"):
        import_peft(inject_lora(small_cnn(), ["2", "4", "8"], rank=3), tmp_path)
    with pytest.raises(ValueError, match=r"unexpected keys \['base_model\.model\.4\.lora_A"):
        import_peft(inject_lora(small_cnn(), "2", rank=3), tmp_path)

    wider = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 10, 1)
    )
    with pytest.raises(
        ValueError,
        match=r"'base_model\.model\.4\.lora_B\.weight'.*\(12, 3, 1, 1\)"
        r".*\(10, 3\)",
    ):
        import_peft(inject_lora(wider, ["2", "4"], rank=3), tmp_path)

    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"adapter_config\.json does not exist"):
        import_peft(layers, tmp_path)


def test_deployed_export_carries_the_frozen_update_exactly(tmp_path):
    """A dense frozen update, no update at all, a joint rank above min(d_out, d_in), and a frozen
    factor pair with a zero term next to the trainable pair: peft applies each layer's whole update,
    ranks follow the non-zero terms, and scaling 0.5 survives as alpha / r."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(),  # 0: dense frozen update
        nn.Conv2d(8, 10, 1, stride=2), nn.ReLU(),  # 2: no update
        nn.Conv2d(10, 4, 1), nn.ReLU(),  # 4: frozen width 3 + trainable 2 > min(4, 10)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 16), nn.ReLU(),
        nn.Linear(16, 12),  # 10: frozen width 3, one term zero, + trainable 2
    ).eval()
    model = copy.deepcopy(plain)
    layers = inject_lora(model, ["0", "2", "4", "10"], rank=2, scaling=0.5)
    randomize(layers)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layers["0"].set_fixed_delta(torch.randn(8, 3, generator=g))
        layers["0"].lora_B.zero_()
        layers["2"].lora_B.zero_()
        layers["4"].set_fixed_delta((torch.randn(4, 3, generator=g), torch.randn(3, 10, generator=g)))
        B = torch.randn(12, 3, generator=g)
        B[:, 1] = 0
        layers["10"].set_fixed_delta((B, torch.randn(3, 16, generator=g)))
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        ours = model(x)

    export_peft(layers, tmp_path, deployed=True)
    ranks = {"0": 3, "2": 1, "4": 4, "10": 4}
    assert adapter_ranks(tmp_path) == ranks
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for name, rank in ranks.items():
        alpha = config["alpha_pattern"].get(f"^{name}", config["lora_alpha"])
        assert alpha / rank == 0.5
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert not state["base_model.model.2.lora_B.weight"].any()
    assert torch.equal(state["base_model.model.0.lora_A.weight"].flatten(1), torch.eye(3))
    torch.testing.assert_close(peft_logits(copy.deepcopy(plain), tmp_path, x), ours, rtol=1e-5, atol=1e-5)

    fresh = copy.deepcopy(plain)
    target = {}
    for name, rank in ranks.items():
        target.update(inject_lora(fresh, name, rank=rank))
    import_peft(target, tmp_path)
    assert [t.scaling for t in target.values()] == [0.5] * 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours, rtol=1e-5, atol=1e-5)
