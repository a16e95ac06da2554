"""PyTorch twin of the book's ResNet-34 (NCHW)."""

from torch_impl.residual_unit import ResidualUnit
from torch_impl.resnet34 import STAGES, ResNet34

__all__ = ["STAGES", "ResNet34", "ResidualUnit"]
