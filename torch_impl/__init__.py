"""PyTorch twin of the book's ResNet-34 (NCHW)."""

from torch_impl.padding import CONVENTIONS
from torch_impl.residual_unit import ResidualUnit
from torch_impl.resnet34 import STAGES, ResNet34, torchvision_key

__all__ = ["CONVENTIONS", "STAGES", "ResNet34", "ResidualUnit", "torchvision_key"]
