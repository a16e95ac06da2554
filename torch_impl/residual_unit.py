"""The book's ResidualUnit (Géron, ch. 14) in PyTorch, NCHW; mirrors ``keras_impl/residual_unit.py``."""

from __future__ import annotations

import torch
from torch import nn

from torch_impl.initializers import initialize_like_keras
from torch_impl.layers import activation as make_activation
from torch_impl.layers import batch_norm
from torch_impl.padding import check_convention, conv2d


class ResidualUnit(nn.Module):
    """Two 3x3 conv/BN layers plus a skip connection; a 1x1 conv/BN projection when strided.

    Args:
        in_channels: channels of the input (Keras infers these; torch needs them up front).
        filters: channels of the output.
        strides: stride of the first 3x3 conv and of the projection.
        activation: a Keras activation name, applied inside the main path and after the sum.
        convention: "book" (TF "same" padding, BatchNorm epsilon 1e-3, momentum 0.99) or "torchvision"
            (symmetric padding, epsilon 1e-5, momentum 0.9).
        kernel_initializer: "glorot_uniform" (Keras's default, the book's) or "he_normal", drawn as Keras draws.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        strides: int = 1,
        activation: str = "relu",
        convention: str = "book",
        kernel_initializer: str = "glorot_uniform",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("filters", filters), ("strides", strides)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ResidualUnit needs a positive integer {name}. Received: {name}={value!r}")
        if strides == 1 and in_channels != filters:
            raise ValueError(
                "ResidualUnit with strides=1 adds its input unchanged, so in_channels must equal filters. "
                f"Received: in_channels={in_channels}, filters={filters}"
            )
        self.in_channels, self.filters, self.strides = in_channels, filters, strides
        self.activation_name = activation
        self.activation = make_activation(activation)
        self.convention = check_convention(convention)
        self.main_layers = nn.ModuleList(
            [
                conv2d(in_channels, filters, 3, strides, convention=convention),
                batch_norm(filters, convention=convention),
                make_activation(activation),
                conv2d(filters, filters, 3, convention=convention),
                batch_norm(filters, convention=convention),
            ]
        )
        # As in the book, the projection exists only when the unit is strided.
        self.skip_layers = nn.ModuleList(
            [
                conv2d(in_channels, filters, 1, strides, convention=convention),
                batch_norm(filters, convention=convention),
            ]
            if strides > 1
            else []
        )
        initialize_like_keras(self, kernel_initializer)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        z = inputs
        for layer in self.main_layers:
            z = layer(z)
        skip_z = inputs
        for layer in self.skip_layers:
            skip_z = layer(skip_z)
        return self.activation(z + skip_z)
