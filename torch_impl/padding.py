"""TensorFlow/Keras "same" padding for PyTorch: the one module of ``torch_impl`` that knows about it.

TF pads ``total = max(k - s, 0)`` if ``size % s == 0`` else ``max(k - size % s, 0)`` along each axis and
puts the odd pixel at the bottom/right. PyTorch's symmetric ``padding=k // 2`` gives the same output size
on a shifted sampling grid, so every number downstream differs (see docs/pitfalls.md). Where the padding is
the same for every input size (a 1x1 window, or stride 1 with an odd kernel) it is static and free;
otherwise it is computed from the input at run time, like timm's ``Conv2dSame``. Even then a copy is
made only where it must be: symmetric padding goes to the convolution itself, and a max-pool takes the
odd bottom/right pixel from ``ceil_mode`` (whose overhanging cells never win, exactly like TF's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding that TF "same" applies along one axis of length ``size``."""
    remainder = size % stride
    total = max(kernel_size - (stride if remainder == 0 else remainder), 0)
    return total // 2, total - total // 2


def _static_padding(kernel_size: int, stride: int) -> int | None:
    """Symmetric padding that is exact for every input size, or None if it depends on the size."""
    # Not `kernel_size <= stride`: a 2x2/s2 window on an odd size gets TF padding (0, 1).
    if kernel_size == 1:
        return 0
    if stride == 1 and kernel_size % 2 == 1:
        return (kernel_size - 1) // 2
    return None


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad an NCHW tensor as TF "same" would before a ``kernel_size``/``stride`` window."""
    top, bottom = same_padding(x.shape[-2], kernel_size, stride)
    left, right = same_padding(x.shape[-1], kernel_size, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def padded_for_conv(x: torch.Tensor, kernel_size: int, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``x`` and the symmetric (H, W) padding that give TF "same" in ``F.conv2d``; a copy only if uneven."""
    top, bottom = same_padding(x.shape[-2], kernel_size, stride)
    left, right = same_padding(x.shape[-1], kernel_size, stride)
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _ceil_mode_output(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of torch's max-pool with ``ceil_mode=True`` (the formula of the MaxPool2d docs)."""
    out = -(-(size + 2 * padding - kernel_size) // stride) + 1
    # The last window must start inside the input or the left padding.
    return out - 1 if (out - 1) * stride >= size + padding else out


def ceil_mode_padding(size: int, kernel_size: int, stride: int) -> int | None:
    """Symmetric padding with which torch's ``ceil_mode`` max-pool gives TF "same" on ``size``, or None."""
    before, _ = same_padding(size, kernel_size, stride)
    exact = before <= kernel_size // 2 and _ceil_mode_output(size, kernel_size, stride, before) == -(-size // stride)
    return before if exact else None


def max_pool_same(x: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """TF "same" max-pooling of an NCHW tensor; -inf padding, copied only where ``ceil_mode`` cannot do it."""
    padding = [ceil_mode_padding(size, kernel_size, stride) for size in x.shape[-2:]]
    if None in padding:
        return F.max_pool2d(pad_same(x, kernel_size, stride, value=float("-inf")), kernel_size, stride)
    return F.max_pool2d(x, kernel_size, stride, padding=tuple(padding), ceil_mode=True)


class Conv2dSame(nn.Conv2d):
    """Square-kernel ``nn.Conv2d`` with TF "same" padding, bias-free by default as in the book."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False
    ) -> None:
        padding = _static_padding(kernel_size, stride)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=padding or 0, bias=bias)
        self.dynamic_padding = padding is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_padding:
            return super().forward(x)
        x, padding = padded_for_conv(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TF "same" padding; padded cells never win (they are -inf, not 0)."""

    def __init__(self, kernel_size: int, stride: int) -> None:
        padding = _static_padding(kernel_size, stride)
        # torch's own max-pool padding already behaves as -inf.
        super().__init__(kernel_size, stride, padding=padding or 0)
        self.dynamic_padding = padding is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_padding:
            return super().forward(x)
        return max_pool_same(x, self.kernel_size, self.stride)


CONVENTIONS = ("book", "torchvision")


def check_convention(convention: str) -> str:
    """``convention`` if it is one of CONVENTIONS; a ValueError naming them otherwise."""
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention; expected one of {CONVENTIONS}. Received: convention={convention!r}")
    return convention


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, convention: str = "book"):
    """A bias-free conv padded as ``convention`` pads: TF "same" (book) or symmetric k // 2 (torchvision)."""
    if check_convention(convention) == "torchvision":
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return Conv2dSame(in_channels, out_channels, kernel_size, stride)


def max_pool2d(kernel_size: int, stride: int, *, convention: str = "book") -> nn.MaxPool2d:
    """A max-pool padded as ``convention`` pads: TF "same" (book) or k // 2 on every side (torchvision)."""
    if check_convention(convention) == "torchvision":
        return nn.MaxPool2d(kernel_size, stride, padding=kernel_size // 2)
    return MaxPool2dSame(kernel_size, stride)


def padding_of(module: nn.Module) -> str | int:
    """'same' (TF, size-dependent) or the symmetric padding of a conv / max-pool built by this module."""
    if isinstance(module, Conv2dSame | MaxPool2dSame) and module.dynamic_padding:
        return "same"
    height, width = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
    return height if height == width else repr(module.padding)  # uneven (H, W) padding fits no convention
