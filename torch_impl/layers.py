"""Keras-equivalent building blocks for the PyTorch twin (TF padding lives in ``padding.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_impl.padding import check_convention

# Keras BatchNormalization defaults. torch's own are eps=1e-5 and momentum=0.1, and its momentum is
# the weight of the NEW batch statistic: torch momentum = 1 - keras momentum.
KERAS_BN_EPSILON = 1e-3
KERAS_BN_MOMENTUM = 0.99
# (epsilon, Keras momentum) per convention; mirrored by keras_impl/layers.py.
BATCH_NORM = {"book": (KERAS_BN_EPSILON, KERAS_BN_MOMENTUM), "torchvision": (1e-5, 0.9)}

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


class KerasBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that trains like keras ``BatchNormalization``.

    In ``train()`` mode it normalises with the batch statistics (as torch does) and updates the moving
    statistics with Keras's formula, ``moving = moving * momentum + batch * (1 - momentum)``, storing the
    BIASED batch variance; torch's own module stores the unbiased one (a factor n / (n - 1)). Evaluation
    is torch's. ``momentum`` stays torch's attribute (1 - keras momentum, the weight of the new batch).
    """

    def __init__(self, num_features: int, eps: float = KERAS_BN_EPSILON, keras_momentum: float = KERAS_BN_MOMENTUM):
        super().__init__(num_features, eps=eps, momentum=1.0 - keras_momentum)

    @property
    def keras_momentum(self) -> float:
        """Keras's momentum (the weight of the old statistic); 1 - (1 - m) == m for Keras's usual values."""
        return 1.0 - self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.shape[0] * x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        with torch.no_grad():
            mean = x.mean(dim=(0, 2, 3))
            variance = x.var(dim=(0, 2, 3), unbiased=False)
            m = self.keras_momentum
            self.running_mean.copy_(self.running_mean * m + mean * (1.0 - m))
            self.running_var.copy_(self.running_var * m + variance * (1.0 - m))
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def batch_norm(num_features: int, *, convention: str = "book") -> KerasBatchNorm2d:
    """BatchNorm with the epsilon and momentum of ``convention``, and Keras's training-mode update."""
    epsilon, keras_momentum = BATCH_NORM[check_convention(convention)]
    return KerasBatchNorm2d(num_features, epsilon, keras_momentum)


class GlobalAvgPool2d(nn.Module):
    """Mean over H and W: (N, C, H, W) -> (N, C), like keras ``GlobalAveragePooling2D``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Dense(nn.Linear):
    """``nn.Linear`` followed by an activation, like keras ``Dense(units, activation=...)``."""

    def __init__(self, in_features: int, units: int, activation_name: str | None = None) -> None:
        super().__init__(in_features, units)
        self.activation = activation(activation_name)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The affine part alone: what the activation is applied to."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.logits(x))
