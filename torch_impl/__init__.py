"""PyTorch twin of the book's ResNet-34 (NCHW), and ``fuse``: its inference-only rewrite for the GPU."""

from torch_impl.fusion import FusedResNet34, fuse
from torch_impl.padding import CONVENTIONS
from torch_impl.residual_unit import ResidualUnit
from torch_impl.resnet34 import STAGES, ResNet34, torchvision_key

__all__ = ["CONVENTIONS", "STAGES", "FusedResNet34", "ResNet34", "ResidualUnit", "fuse", "torchvision_key"]
