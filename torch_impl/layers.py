"""Keras-equivalent building blocks for the PyTorch twin (TF padding lives in ``padding.py``)."""

from __future__ import annotations

import torch
from torch import nn

# Keras BatchNormalization defaults. torch's own are eps=1e-5 and momentum=0.1, and its momentum is
# the weight of the NEW batch statistic: torch momentum = 1 - keras momentum.
KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99

# Keras activation names -> torch modules with the same definition (keras defaults: ELU alpha=1,
# exact GELU). Keras's "leaky_relu" slope (0.2) differs from torch's default, so it is spelled out.
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "linear": nn.Identity,
    "softmax": lambda: nn.Softmax(dim=-1),
}


def activation(name: str | None) -> nn.Module:
    """The torch module for a Keras activation name (None and "linear" give the identity)."""
    key = "linear" if name is None else name
    if key not in _ACTIVATIONS:
        raise ValueError(f"Unsupported activation; expected one of {sorted(_ACTIVATIONS)}. Received: {name!r}")
    module = _ACTIVATIONS[key]()
    module.keras_name = key  # remembered for the converter and for repr
    return module


def batch_norm(num_features: int) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` with Keras's epsilon and momentum."""
    return nn.BatchNorm2d(num_features, eps=KERAS_BN_EPSILON, momentum=1.0 - KERAS_BN_MOMENTUM)


class GlobalAvgPool2d(nn.Module):
    """Mean over H and W: (N, C, H, W) -> (N, C), like keras ``GlobalAveragePooling2D``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Dense(nn.Linear):
    """``nn.Linear`` followed by an activation, like keras ``Dense(units, activation=...)``."""

    def __init__(self, in_features: int, units: int, activation_name: str | None = None) -> None:
        super().__init__(in_features, units)
        self.activation = activation(activation_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(super().forward(x))
