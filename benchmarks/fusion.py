"""An inference-only rewrite of the torch twin for the GPU: fewer, fused kernels, the same function.

Every BatchNorm is folded into the convolution before it (in float64, then cast), and on CUDA each
``conv + bias [+ residual] + ReLU`` is ONE cuDNN call (``torch.cudnn_convolution_relu`` /
``torch.cudnn_convolution_add_relu``, cuDNN's runtime-fusion engines) instead of a convolution followed
by an element-wise kernel that reads and writes the whole activation again. Off CUDA the same folded
layers run as ``F.conv2d`` + add + ReLU, which is how the tests check the folding on a CPU.

TF "same" padding still comes from ``torch_impl.padding``. The benchmark's ``max_rel_err`` column checks
every row of this model against the Keras float32 reference, like every other row.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from torch_impl import ResidualUnit, ResNet34
from torch_impl.padding import Conv2dSame, padded_for_conv


@torch.no_grad()  # constants, not part of the model's autograd graph (and so a fused model can be deep-copied)
def fold_batch_norm(conv: Conv2dSame, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one convolution that computes ``bn(conv(x))`` in eval mode, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - bn.running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return weight, bias


class FusedConv(nn.Module):
    """A TF-"same" convolution with its BatchNorm folded in, optionally + residual and ReLU, in one call."""

    def __init__(self, conv: Conv2dSame, bn: nn.BatchNorm2d, relu: bool) -> None:
        super().__init__()
        weight, bias = fold_batch_norm(conv, bn)
        dtype = conv.weight.dtype
        self.register_buffer("weight", weight.to(dtype))
        self.register_buffer("bias", bias.to(dtype))
        self.kernel_size, self.stride, self.relu = conv.kernel_size[0], conv.stride[0], relu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x, padding = padded_for_conv(x, self.kernel_size, self.stride)
        stride, dilation = (self.stride, self.stride), (1, 1)
        if self.relu and x.is_cuda:
            if residual is None:
                return torch.cudnn_convolution_relu(x, self.weight, self.bias, stride, padding, dilation, 1)
            return torch.cudnn_convolution_add_relu(
                x, self.weight, residual, 1.0, self.bias, stride, padding, dilation, 1
            )
        y = F.conv2d(x, self.weight, self.bias, stride, padding)
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y


class FusedResidualUnit(nn.Module):
    """``ResidualUnit`` as two or three fused convolutions: relu(conv_bn2(relu(conv_bn1(x))) + skip(x))."""

    def __init__(self, unit: ResidualUnit) -> None:
        super().__init__()
        conv1, bn1, _, conv2, bn2 = unit.main_layers
        self.conv1 = FusedConv(conv1, bn1, relu=True)
        self.conv2 = FusedConv(conv2, bn2, relu=True)  # + the skip, then ReLU: cudnn_convolution_add_relu
        self.skip = FusedConv(*unit.skip_layers, relu=False) if len(unit.skip_layers) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.skip is None else self.skip(x)
        return self.conv2(self.conv1(x), residual=skip)


class FusedResNet34(nn.Module):
    """Inference-only ResNet-34 built from a (trained or converted) ``torch_impl.ResNet34``; logits out.

    Only the book's ReLU network is supported (cuDNN fuses ReLU, not the other activations), and the
    classifier must produce logits (``classifier_activation=None``), which is what the benchmark times.
    """

    def __init__(self, model: ResNet34) -> None:
        super().__init__()
        if model.activation_name != "relu":
            raise ValueError(f"FusedResNet34 fuses ReLU only. Received: activation={model.activation_name!r}")
        if model.classifier_activation not in (None, "linear"):
            raise ValueError(
                "FusedResNet34 returns logits; build the model with classifier_activation=None. "
                f"Received: classifier_activation={model.classifier_activation!r}"
            )
        self.stem = FusedConv(model.stem_conv, model.stem_bn, relu=True)
        self.stem_pool = model.stem_pool  # the max-pool and the global average pool hold no weights
        self.units = nn.Sequential(*(FusedResidualUnit(unit) for unit in model if isinstance(unit, ResidualUnit)))
        self.avg_pool = model.avg_pool
        self.classifier = copy.deepcopy(model.classifier)  # its own copy, in its own dtype

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem_pool(self.stem(x)))
        return self.classifier(self.avg_pool(x))
