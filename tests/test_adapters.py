"""LoRA layers, injection, factor switching and factor state dicts."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from fedlorm.adapters import (
    VIT_TARGETS,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    reset_lora,
    set_trainable_factor,
)

VIT_LAYERS = [
    f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
]


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
        nn.Conv2d(3, 8, 3, padding=1),  # 0: 3×3, never a target
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
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


# --- B = 0 leaves the backbone bit-identical -------------------------------------------------


def test_zero_b_is_bit_identical_on_vit():
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        layers = inject_lora(model, VIT_TARGETS, rank=4, scaling=0.5)
        after = model(x)
    assert list(layers) == VIT_LAYERS
    assert all(layer.lora_A.abs().sum() > 0 for layer in layers.values())
    assert torch.equal(before, after)


def test_zero_b_is_bit_identical_on_cnn():
    model = small_cnn()
    x = torch.randn(2, 3, 9, 9)  # odd size: stride 2 keeps the border row/column
    with torch.no_grad():
        before = model(x)
        layers = inject_lora(model, ["2", "4", "8"], rank=3)
        after = model(x)
    assert isinstance(layers["2"], LoRAConv2d) and isinstance(layers["4"], LoRAConv2d)
    assert isinstance(layers["8"], LoRALinear)
    assert torch.equal(before, after)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_b_is_bit_identical_conv_layer(stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1, stride=stride)
    x = torch.randn(2, 6, 7, 5)
    expected = conv(x)
    layer = LoRAConv2d(conv, rank=2, scaling=3.0)
    out = layer(x)
    assert out.shape == expected.shape
    assert torch.equal(out, expected)


def test_zero_b_is_bit_identical_with_zero_outputs():
    # base output exactly 0 (and -0): adding the zero LoRA branch keeps every bit
    base = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        base.weight.zero_()
        base.weight[0, 0] = -1.0
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, -1.0, 0.5, 2.0]])
    expected = base(x)
    out = LoRALinear(base, rank=2)(x)
    assert torch.equal(out, expected)
    assert torch.equal(torch.signbit(out), torch.signbit(expected))


# --- forward against a hand computation --------------------------------------------------------


def test_linear_forward_matches_hand_computation():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, rank=3, scaling=0.7)
    randomize({"l": layer})
    delta = torch.randn(5, 6, dtype=torch.float64)
    layer.set_fixed_delta(delta)
    x = torch.randn(2, 4, 6, dtype=torch.float64)  # token inputs (batch, tokens, d_in)
    W = base.weight + delta + 0.7 * layer.lora_B @ layer.lora_A
    expected = x @ W.T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), 0.7 * layer.lora_B @ layer.lora_A)
    layer.set_fixed_delta(None)
    assert layer.fixed_delta is None
    torch.testing.assert_close(layer(x), x @ (W - delta).T + base.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_forward_matches_hand_computation(stride):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 1, stride=stride).double()
    layer = LoRAConv2d(base, rank=2, scaling=1.5)
    randomize({"c": layer})
    delta = torch.randn(6, 4, dtype=torch.float64)
    layer.set_fixed_delta(delta)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    W = base.weight[:, :, 0, 0] + delta + 1.5 * layer.lora_B @ layer.lora_A
    xs = x[:, :, ::stride, ::stride]
    expected = torch.einsum("oc,nchw->nohw", W, xs) + base.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("fixed", [None, "dense", "factors"])
def test_the_merged_inference_path_and_the_training_path_compute_the_same_layer(kind, fixed):
    # Without a factor gradient the layer applies W + F + s·BA as one matrix; with one, the base and
    # the thin products. Both equal the hand computation (float64, so to round-off).
    torch.manual_seed(0)
    if kind == "linear":
        layer: LoRALayer = LoRALinear(nn.Linear(6, 5).double(), rank=3, scaling=0.7)
        x = torch.randn(2, 4, 6, dtype=torch.float64)
    else:
        layer = LoRAConv2d(nn.Conv2d(6, 5, 1, stride=2).double(), rank=3, scaling=0.7)
        x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    randomize({"l": layer})
    frozen = torch.zeros(5, 6, dtype=torch.float64)
    if fixed == "dense":
        frozen = torch.randn(5, 6, dtype=torch.float64)
        layer.set_fixed_delta(frozen)
    elif fixed == "factors":
        B, A = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
        frozen = B @ A
        layer.set_fixed_delta((B, A))
    W = layer.base.weight.reshape(5, 6) + frozen + 0.7 * layer.lora_B.detach() @ layer.lora_A.detach()
    if kind == "linear":
        expected = x @ W.T + layer.base.bias
    else:
        expected = torch.einsum("oc,nchw->nohw", W, x[:, :, ::2, ::2]) + layer.base.bias[None, :, None, None]
    training = layer(x)
    with torch.no_grad():
        inference = layer(x)
    torch.testing.assert_close(layer.merged_weight().detach(), W, rtol=1e-12, atol=1e-12)
    assert training.requires_grad and not inference.requires_grad
    torch.testing.assert_close(training.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inference, expected, rtol=1e-12, atol=1e-12)
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)  # e.g. head-only training: no factor gradient wanted
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_cnn_backbones_keep_channels_last_weights_and_vits_do_not():
    from fedlorm.backbones import create_backbone

    cnn = create_backbone("efficientnet_lite0", 4, pretrained=False, img_size=32)
    convs = [m for m in cnn.encoder.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    vit = create_backbone("test_vit", 4, pretrained=False, img_size=32)
    assert not vit.channels_last and cnn.channels_last


def test_layer_attributes_and_freezing():
    base = nn.Linear(8, 6).double()
    layer = LoRALinear(base, rank=4)
    assert layer.base is base
    assert (layer.in_features, layer.out_features, layer.rank, layer.scaling) == (8, 6, 4, 1.0)
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (6, 4)
    assert layer.lora_A.dtype == torch.float64 and layer.lora_B.dtype == torch.float64
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    conv = LoRAConv2d(nn.Conv2d(8, 6, 1, stride=2, bias=False), rank=3)
    assert conv.lora_A.shape == (3, 8) and conv.lora_B.shape == (6, 3)
    with pytest.raises(ValueError, match=r"\(6, 8\).*\(5, 8\)"):
        layer.set_fixed_delta(torch.zeros(5, 8))
    layer.set_fixed_delta(torch.ones(6, 8, dtype=torch.float32))
    assert layer.fixed_delta.dtype == torch.float64 and "fixed_delta" in layer.state_dict()
    # a checkpoint with a fixed_delta loads into a fresh layer (strict)
    fresh = LoRALinear(nn.Linear(8, 6).double(), rank=4)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.fixed_delta, torch.ones(6, 8, dtype=torch.float64))
    assert torch.equal(fresh.lora_A, layer.lora_A)


def test_reset_parameters_is_seeded():
    layers = [LoRALinear(nn.Linear(16, 8), rank=4) for _ in range(3)]
    for layer in layers:
        randomize({"l": layer})
    layers[0].reset_parameters(torch.Generator().manual_seed(7))
    layers[1].reset_parameters(torch.Generator().manual_seed(7))
    layers[2].reset_parameters(torch.Generator().manual_seed(8))
    assert torch.equal(layers[0].lora_A, layers[1].lora_A)
    assert not torch.equal(layers[0].lora_A, layers[2].lora_A)
    for layer in layers:
        assert torch.equal(layer.lora_B, torch.zeros(8, 4))
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(16)  # kaiming-uniform, a=√5
        assert layer.lora_A.std() > 0.5 / math.sqrt(3 * 16)  # and not degenerate
    # reset_lora draws the layers in order from one generator
    seed7 = layers[0].lora_A.detach().clone()
    randomize({"a": layers[0], "b": layers[1]})
    reset_lora({"a": layers[0], "b": layers[1]}, torch.Generator().manual_seed(7))
    assert torch.equal(layers[0].lora_A, seed7)
    assert not torch.equal(layers[1].lora_A, seed7)
    assert torch.equal(layers[1].lora_B, torch.zeros(8, 4))


# --- factor switching ---------------------------------------------------------------------------


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize(
    ("factor", "A_moves", "B_moves"),
    [("B", False, True), ("A", True, False), ("both", True, True), ("none", False, False)],
)
def test_set_trainable_factor(factor, A_moves, B_moves):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    layers = inject_lora(model, "0", rank=2)
    randomize(layers)  # B ≠ 0, so A gets a gradient too
    set_trainable_factor(layers, factor)
    A0, B0 = layers["0"].lora_A.detach().clone(), layers["0"].lora_B.detach().clone()
    _train_step(model, torch.randn(5, 6))
    assert torch.equal(layers["0"].lora_A, A0) is not A_moves
    assert torch.equal(layers["0"].lora_B, B0) is not B_moves
    assert layers["0"].lora_A.requires_grad is A_moves
    assert layers["0"].lora_B.requires_grad is B_moves


def test_set_trainable_factor_rejects_unknown_factor():
    layers = inject_lora(nn.Sequential(nn.Linear(4, 4)), "0", rank=1)
    with pytest.raises(ValueError, match=r"\['A', 'B', 'both', 'none'\], got 'AB'"):
        set_trainable_factor(layers, "AB")


# --- injection ----------------------------------------------------------------------------------


def test_inject_vit_targets_only_and_keeps_requires_grad():
    model = tiny_vit()
    model.head.weight.requires_grad_(False)
    layers = inject_lora(model, VIT_TARGETS, rank=2)
    assert list(layers) == VIT_LAYERS == list(lora_layers(model))
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert model.blocks[0].attn.qkv is layers["blocks.0.attn.qkv"]
    assert not model.head.weight.requires_grad and model.head.bias.requires_grad
    assert model.blocks[0].norm1.weight.requires_grad  # untouched: the caller freezes
    assert not model.blocks[0].attn.qkv.base.weight.requires_grad


def test_inject_exclude_and_disjoint_second_call():
    model = tiny_vit()
    first = inject_lora(model, VIT_TARGETS, rank=4, exclude=r"blocks\.\d+\.mlp\..*")
    assert list(first) == [n for n in VIT_LAYERS if ".attn." in n]
    second = inject_lora(model, r"blocks\.\d+\.mlp\.fc\d", rank=2)
    assert list(second) == [n for n in VIT_LAYERS if ".mlp." in n]
    assert list(lora_layers(model)) == VIT_LAYERS
    assert {layer.rank for layer in first.values()} == {4}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*already"):
        inject_lora(model, VIT_TARGETS, rank=2)


def test_inject_errors_name_the_culprit():
    model = small_cnn()
    with pytest.raises(ValueError, match=r"'nothing\\\\\.here'.*module names look like: 0, 1, 2"):
        inject_lora(model, ["2", r"nothing\.here"], rank=1)
    with pytest.raises(ValueError, match=r"'0'.*kernel_size=\(3, 3\)"):
        inject_lora(model, "[02]", rank=1)
    with pytest.raises(ValueError, match=r"'1'.*ReLU"):
        inject_lora(model, "1", rank=1)
    with pytest.raises(ValueError, match=r"^module .2.: rank 0 .*d_out=16, d_in=8.*allowed 1\.\.8"):
        inject_lora(model, "2", rank=0)
    assert lora_layers(model) == {}  # nothing half-done
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 4, 1, padding=1))
    with pytest.raises(ValueError, match=r"^module .0.: .*groups=2"):
        inject_lora(grouped, "0", rank=1)
    with pytest.raises(ValueError, match=r"^module .1.: .*padding=\(1, 1\)"):
        inject_lora(grouped, "1", rank=1)


@pytest.mark.parametrize("rank", [0, -1, 7])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=rf"rank {rank} .*d_out=6, d_in=10.*allowed 1\.\.6"):
        LoRALinear(nn.Linear(10, 6), rank=rank)


# --- factor state dicts -------------------------------------------------------------------------


def test_lora_state_dict_roundtrip():
    src = tiny_vit()
    src_layers = inject_lora(src, VIT_TARGETS, rank=2)
    randomize(src_layers)
    state = lora_state_dict(src_layers)
    assert list(state) == [f"{n}.lora_{f}" for n in VIT_LAYERS for f in "AB"]
    assert not any(t.requires_grad for t in state.values())
    state["blocks.0.attn.qkv.lora_A"].add_(1.0)  # a copy, not the parameter
    assert not torch.equal(
        state["blocks.0.attn.qkv.lora_A"], src_layers["blocks.0.attn.qkv"].lora_A
    )
    state = lora_state_dict(src_layers)

    dst_layers = inject_lora(tiny_vit(), VIT_TARGETS, rank=2)
    load_lora_state_dict(dst_layers, state)
    for name in VIT_LAYERS:
        assert torch.equal(dst_layers[name].lora_A, src_layers[name].lora_A)
        assert torch.equal(dst_layers[name].lora_B, src_layers[name].lora_B)
        assert dst_layers[name].lora_A.requires_grad


def test_load_lora_state_dict_errors():
    layers = inject_lora(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3)), ["0", "1"], rank=2)
    state = lora_state_dict(layers)
    partial = {k: v for k, v in state.items() if k != "1.lora_B"}
    with pytest.raises(ValueError, match=r"missing keys \['1\.lora_B'\]"):
        load_lora_state_dict(layers, partial)
    with pytest.raises(ValueError, match=r"unexpected keys \['2\.lora_A'\]"):
        load_lora_state_dict(layers, {**state, "2.lora_A": torch.zeros(2, 3)})
    load_lora_state_dict(layers, partial, strict=False)  # fine when not strict
    bad = {**state, "0.lora_A": torch.zeros(3, 6)}
    with pytest.raises(ValueError, match=r"'0\.lora_A'.*\(3, 6\).*\(2, 6\)"):
        load_lora_state_dict(layers, bad)
