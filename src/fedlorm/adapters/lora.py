"""LoRA layers that wrap a frozen ``nn.Linear`` or 1×1 ``nn.Conv2d``.

Why not peft's ``LoraLayer``: LoRM trains one factor per round (B, then A, ...), writes closed-form
server solutions straight into the factors, adds a frozen update, dense or as a factor pair (the
merged update of earlier tasks), next to the trainable one, and hooks the layer's input for
statistics. peft's layer is built around named adapters, dropout, merging and variants, not around
per-round factor switching and in-place closed-form writes, so we keep a small layer of our own and
speak peft's format on disk (see :mod:`fedlorm.adapters.peft_io`).

Conventions (the paper's): ``ΔW = scaling · B A`` with ``B ∈ R^{d_out×r}``, ``A ∈ R^{r×d_in}``,
``scaling = 1.0`` by default (no α/r), ``B = 0`` and ``A`` kaiming-uniform at reset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRAConv2d", "LoRALayer", "LoRALinear", "check_pointwise_conv"]


def check_pointwise_conv(conv: nn.Conv2d) -> None:
    """Raise ValueError unless ``conv`` is a 1×1 convolution with groups=1 and padding 0.

    Such a convolution is a linear map of the channel vector at every (strided) position, which is
    what LoRA factors and input Grams assume. The stride may be anything.

    Args:
        conv: The convolution to check.

    Raises:
        ValueError: One line naming every property that is not allowed.
    """
    kernel = tuple(conv.kernel_size)
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    problems = []
    if kernel != (1, 1):
        problems.append(f"kernel_size={kernel} (need (1, 1))")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (need 1)")
    if padding not in ((0, 0), "valid", "same"):  # "same" is 0 for a 1×1 kernel
        problems.append(f"padding={padding} (need 0)")
    if problems:
        raise ValueError(
            f"LoRA supports only 1×1 Conv2d layers with groups=1 and padding 0; got {conv} with "
            + ", ".join(problems)
        )


class LoRALayer(nn.Module):
    """Base of the LoRA wrappers: ``y = base(x) + x·Fᵀ + scaling·(x Aᵀ) Bᵀ`` with F a frozen update.

    ``base`` is the wrapped module; the wrapper freezes its parameters. ``lora_A`` (r × d_in) and
    ``lora_B`` (d_out × r) are plain 2-D parameters in the base weight's dtype and device.
    ``scaling`` is a plain float the caller may change. The frozen update F (fedlorm keeps the
    merged update of earlier tasks there) is None, dense (``fixed_delta``, d_out × d_in), or in
    factor form F = ``fixed_B`` (d_out × k) · ``fixed_A`` (k × d_in), applied as two thin products
    like the trainable pair. Subclasses say how a d_out × d_in matrix acts on their input.

    Args:
        base: The module to wrap; its parameters are frozen.
        in_features: d_in of the wrapped layer.
        out_features: d_out of the wrapped layer.
        rank: The rank r, 1 <= r <= min(d_in, d_out).
        scaling: The factor on B A (fedlorm's default 1: ΔW = B A, no α/r).

    Raises:
        ValueError: If ``rank`` is out of range.
    """

    fixed_delta: Tensor | None

    def __init__(
        self, base: nn.Module, in_features: int, out_features: int, rank: int, scaling: float
    ) -> None:
        super().__init__()
        if (
            not isinstance(rank, int)
            or isinstance(rank, bool)
            or not 1 <= rank <= min(in_features, out_features)
        ):
            raise ValueError(
                f"rank {rank!r} is out of range for {base} (d_out={out_features}, "
                f"d_in={in_features}): allowed 1..{min(in_features, out_features)}"
            )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = float(scaling)
        weight = base.weight
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.register_buffer("fixed_delta", None)
        self.register_buffer("fixed_A", None)
        self.register_buffer("fixed_B", None)
        self.reset_parameters()

    # How a (d_out' × d_in') matrix acts on this layer's input (A, fixed_delta) or on the rank-r
    # hidden activation (B).
    def _apply_to_input(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_to_hidden(self, h: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The wrapped layer's operation with ``weight`` (d_out × d_in) in place of its own."""
        raise NotImplementedError

    def merged_weight(self) -> Tensor:
        """The layer as one matrix: W + F + scaling·B A.

        With B = 0 and no frozen update this is W itself, bit for bit (W + 0 = W).

        Returns:
            A (d_out, d_in) tensor in the base weight's dtype, differentiable in the factors.
        """
        weight = self.base.weight.reshape(self.out_features, self.in_features)
        frozen = self.frozen_delta()
        if frozen is not None:
            weight = weight + frozen
        lora = self.lora_B @ self.lora_A
        if self.scaling != 1.0:
            lora = lora * self.scaling
        return weight + lora

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad)):
            # No factor gradient wanted (evaluation, statistics passes, head-only training): one
            # product with the merged matrix instead of the base plus two or four thin ones. The
            # same function up to float round-off; about 30 % of a no-grad pass on the CNN benchmark.
            return self._apply_weight(x, self.merged_weight())
        out = self.base(x)
        if self.fixed_delta is not None:
            out = out + self._apply_to_input(x, self.fixed_delta)
        if self.fixed_A is not None and self.fixed_B is not None:
            out = out + self._apply_to_hidden(self._apply_to_input(x, self.fixed_A), self.fixed_B)
        # Always computed: with B = 0 the branch is an exact (signed) zero, and adding ±0.0 leaves
        # every finite output bit-identical.
        lora = self._apply_to_hidden(self._apply_to_input(x, self.lora_A), self.lora_B)
        if self.scaling != 1.0:  # 1.0·v == v exactly: skip the product (and its backward) then
            lora = lora * self.scaling
        return out + lora

    def delta_weight(self) -> Tensor:
        """The trainable update alone.

        Returns:
            ``scaling · B A`` (d_out, d_in); the frozen update is not included.
        """
        return self.scaling * (self.lora_B @ self.lora_A)

    def frozen_delta(self) -> Tensor | None:
        """The frozen update as a dense matrix, whatever form it was set in.

        Returns:
            F (d_out, d_in), or None if no frozen update is set.
        """
        if self.fixed_A is not None and self.fixed_B is not None:
            return self.fixed_B @ self.fixed_A
        return self.fixed_delta

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Start a new adapter: B = 0 and A kaiming-uniform (a = √5, as ``nn.Linear`` draws).

        Args:
            generator: The random stream to draw A from (default: torch's global one); a CPU
                generator may initialise factors on another device.
        """
        self.lora_B.zero_()
        A = self.lora_A
        if generator is None or generator.device == A.device:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        else:  # e.g. a CPU generator for CUDA factors: draw where the generator lives
            draw = torch.empty(A.shape, dtype=A.dtype, device=generator.device)
            A.copy_(nn.init.kaiming_uniform_(draw, a=math.sqrt(5), generator=generator))

    def set_fixed_delta(self, delta: Tensor | tuple[Tensor, Tensor] | None) -> None:
        """Set or clear the frozen update F, e.g. the merged update of earlier tasks.

        Setting one form clears the other; the layer keeps detached copies in the base's dtype and
        on its device.

        Args:
            delta: A dense (d_out, d_in) matrix; a factor pair ``(B, A)`` with B (d_out, k) and
                A (k, d_in), cheaper to send and apply when k·(d_out + d_in) < d_out·d_in; or None
                to clear it.

        Raises:
            ValueError: If the shapes do not fit the layer.
        """
        self.fixed_delta = self.fixed_A = self.fixed_B = None
        if delta is None:
            return
        if isinstance(delta, tuple):
            B, A = delta
            if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or (
                (B.shape[0], A.shape[1]) != (self.out_features, self.in_features)
            ):
                raise ValueError(
                    f"fixed factors must have shapes ({self.out_features}, k) and "
                    f"(k, {self.in_features}), got {tuple(B.shape)} and {tuple(A.shape)}"
                )
            self.fixed_B, self.fixed_A = self._frozen_copy(B), self._frozen_copy(A)
            return
        shape = (self.out_features, self.in_features)
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"fixed_delta must have shape {shape} (d_out, d_in), got {tuple(delta.shape)}"
            )
        self.fixed_delta = self._frozen_copy(delta)

    def _frozen_copy(self, x: Tensor) -> Tensor:
        weight = self.base.weight
        return x.detach().to(dtype=weight.dtype, device=weight.device).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A None buffer is not an expected key: make room (in the checkpoint's form and factor
        # width) so that a checkpoint taken with a frozen update loads into a fresh layer (values
        # are copied in by the base class).
        B, A = state_dict.get(prefix + "fixed_B"), state_dict.get(prefix + "fixed_A")
        if B is not None and A is not None:
            if self.fixed_B is None or self.fixed_B.shape != B.shape:
                self.set_fixed_delta((torch.zeros(B.shape), torch.zeros(A.shape)))
        elif self.fixed_delta is None and prefix + "fixed_delta" in state_dict:
            self.set_fixed_delta(torch.zeros(self.out_features, self.in_features))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        fixed = "set" if self.fixed_delta is not None else "None"
        if self.fixed_B is not None:
            fixed = f"factors of width {self.fixed_B.shape[1]}"
        return f"rank={self.rank}, scaling={self.scaling}, fixed_delta={fixed}"


class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear`` (any leading dimensions).

    Args:
        base: The linear layer to wrap.
        rank: The rank r.
        scaling: The factor on B A (default 1).

    Raises:
        TypeError: If ``base`` is not an ``nn.Linear``.
        ValueError: If ``rank`` is out of range.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 1.0) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        super().__init__(base, base.in_features, base.out_features, rank, scaling)

    def _apply_to_input(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def _apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.base.bias)

    def _apply_to_hidden(self, h: Tensor, weight: Tensor) -> Tensor:
        return F.linear(h, weight)


class LoRAConv2d(LoRALayer):
    """LoRA around a 1×1 ``nn.Conv2d`` (groups=1, padding 0, any stride).

    Per (strided) spatial position this is LoRALinear on the channel vector: A, ``fixed_A`` and
    ``fixed_delta`` are applied with the base's stride, B and ``fixed_B`` at stride 1 (as peft does
    for convolutions).

    Args:
        base: The 1×1 convolution to wrap.
        rank: The rank r.
        scaling: The factor on B A (default 1).

    Raises:
        TypeError: If ``base`` is not an ``nn.Conv2d``.
        ValueError: If it is not a pointwise convolution, or ``rank`` is out of range.
    """

    def __init__(self, base: nn.Conv2d, rank: int, scaling: float = 1.0) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        check_pointwise_conv(base)
        super().__init__(base, base.in_channels, base.out_channels, rank, scaling)

    def _apply_to_input(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight[:, :, None, None], stride=self.base.stride)

    def _apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.base._conv_forward(x, weight[:, :, None, None], self.base.bias)

    def _apply_to_hidden(self, h: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(h, weight[:, :, None, None])
