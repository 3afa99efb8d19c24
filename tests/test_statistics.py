"""Streaming input Grams collected by InputStatistics, against XᵀX computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlorm.adapters import InputStatistics, inject_lora


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def gram(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return X.T @ X


def token_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))
    inject_lora(model, "[02]", rank=2)
    return model.eval()


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(5, 6, 1, stride=2),  # 2: becomes a LoRAConv2d (stride 2)
        nn.ReLU(),
        nn.Conv2d(6, 7, 1, stride=2),  # 4: stays a plain 1×1 Conv2d (stride 2)
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(7, 4),  # 8: head
    )
    inject_lora(model, "2", rank=2)
    return model.eval()


@pytest.mark.parametrize("mode", ["full", "diag"])
def test_linear_token_inputs_streaming(mode):
    # float64 model: float32 activations would differ with the batch shape by ~1e-8
    model = token_model().double()
    modules = {"0": model[0], "2": model[2], "head": model[4]}
    batches = [torch.randn(n, 5, 6, dtype=torch.float64) for n in (3, 1, 4)]  # (batch, tokens, d)
    with InputStatistics(modules, mode=mode) as stats, torch.no_grad():
        for x in batches:
            model(x)
    with InputStatistics(modules, mode=mode) as big, torch.no_grad():
        model(torch.cat(batches))

    x = torch.cat(batches).reshape(-1, 6)
    with torch.no_grad():
        inputs = {"0": x, "2": model[:2](x), "head": model[:4](x)}
    grams, big_grams = stats.grams(), big.grams()
    for name, X in inputs.items():
        expected = gram(X) if mode == "full" else gram(X).diagonal()
        close(grams[name], expected)
        close(big_grams[name], expected)
    assert stats.rows() == {"0": 40, "2": 40, "head": 40}


@pytest.mark.parametrize("mode", ["full", "diag"])
def test_conv_spatial_inputs_with_stride(mode):
    model = cnn().double()
    modules = {"lora_conv": model[2], "conv": model[4], "head": model[8]}
    batches = [torch.randn(n, 3, 9, 9, dtype=torch.float64) for n in (2, 3)]
    with InputStatistics(modules, mode=mode) as stats, torch.no_grad():
        for x in batches:
            model(x)
    with InputStatistics(modules, mode=mode) as big, torch.no_grad():
        model(torch.cat(batches))

    x = torch.cat(batches)
    with torch.no_grad():
        a2, a4, a8 = model[:2](x), model[:4](x), model[:8](x)
    rows2 = a2[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 5)  # 9×9 → 5×5 positions
    rows4 = a4[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(-1, 6)  # 5×5 → 3×3 positions
    expected = {"lora_conv": gram(rows2), "conv": gram(rows4), "head": gram(a8)}
    for name, G in expected.items():
        G = G if mode == "full" else G.diagonal()
        close(stats.grams()[name], G)
        close(big.grams()[name], G)
    assert stats.rows() == {"lora_conv": 5 * 25, "conv": 5 * 9, "head": 5}


def test_per_module_mode_reset_and_hook_removal():
    model = token_model()
    modules = {"0": model[0], "head": model[4]}
    stats = InputStatistics(modules, mode={"0": "diag", "head": "full"})
    x = torch.randn(4, 6)
    with stats, torch.no_grad():
        model(x)
    grams = stats.grams()
    assert grams["0"].shape == (6,) and grams["head"].shape == (8, 8)
    close(grams["0"], gram(x).diagonal())
    model(x)  # hooks are gone: nothing more is counted
    assert stats.rows() == {"0": 4, "head": 4}
    close(stats.grams()["0"], gram(x).diagonal())
    stats.reset()
    assert stats.rows() == {"0": 0, "head": 0}
    assert torch.equal(stats.grams()["head"], torch.zeros(8, 8, dtype=torch.float64))
    with stats, torch.no_grad():  # reusable after reset
        model(2 * x)
    close(stats.grams()["0"], gram(2 * x).diagonal())


def test_bfloat16_and_autocast_inputs_are_upcast():
    model = token_model()
    x = torch.randn(4, 3, 6)
    stats = InputStatistics({"2": model[2]}, mode="full")
    with stats, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        h = model[:2](x)  # what layer 2 saw: a bfloat16 activation
    assert h.dtype == torch.bfloat16
    close(stats.grams()["2"], gram(h.reshape(-1, 8)))

    model = token_model().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with InputStatistics({"0": model[0]}, mode="full") as stats, torch.no_grad():
        model(xb)
    close(stats.grams()["0"], gram(xb.reshape(-1, 6)))


def test_errors():
    model = cnn()
    with pytest.raises(ValueError, match=r"module '0': .*kernel_size=\(3, 3\)"):
        InputStatistics({"0": model[0]})
    with pytest.raises(ValueError, match=r"module 'relu': .*ReLU"):
        InputStatistics({"relu": model[1]})
    with pytest.raises(ValueError, match=r"'head'.*'full', 'diag'.*'dense'"):
        InputStatistics({"head": model[8]}, mode="dense")
    with pytest.raises(ValueError, match=r"missing names \['head'\]"):
        InputStatistics({"head": model[8], "conv": model[4]}, mode={"conv": "full"})
