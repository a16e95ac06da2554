"""The book's ResNet-34 in PyTorch (NCHW); mirrors ``keras_impl/resnet34.py`` layer for layer.

``ResNet34`` is an ``nn.Sequential`` whose children carry the Keras model's layer names, so
``keras_model.layers[i]`` and ``list(torch_model.named_children())[i]`` are the same layer.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from torch_impl.initializers import initialize_like_keras
from torch_impl.layers import Dense, GlobalAvgPool2d, batch_norm
from torch_impl.layers import activation as make_activation
from torch_impl.padding import check_convention, conv2d, max_pool2d
from torch_impl.residual_unit import ResidualUnit

# (filters, units) per stage: 3/4/6/3 units of 64/128/256/512 filters.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))


class ResNet34(nn.Sequential):
    """ResNet-34 of Géron's ch. 14: 7x7/2 conv, BN, activation, 3x3/2 max-pool, 16 units, GAP, Dense.

    Args:
        num_classes: width of the Dense head; 0 leaves out the head (pooling and Dense): the trunk alone, whose
            output is the feature map, like keras-hub's ResNetBackbone and transformers' ResNetModel.
        in_channels: channels of the input images.
        classifier_activation: Keras name of the head's activation; None gives logits.
        activation: Keras name of the activation used everywhere else (the book uses "relu").
        convention: "book" (TF "same" padding, BatchNorm epsilon 1e-3, momentum 0.99: the book's function) or
            "torchvision" (symmetric padding, epsilon 1e-5, momentum 0.1 in torch's terms: torchvision's and
            timm's function).
        kernel_initializer: "glorot_uniform" (Keras's default, the book's) or "he_normal", drawn as Keras draws.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_activation: str | None = "softmax",
        activation: str = "relu",
        convention: str = "book",
        kernel_initializer: str = "glorot_uniform",
    ) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ValueError(
                f"ResNet34 needs an integer num_classes >= 0 (0: no head). Received: num_classes={num_classes!r}"
            )
        check_convention(convention)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem_conv=conv2d(in_channels, 64, 7, 2, convention=convention),
            stem_bn=batch_norm(64, convention=convention),
            stem_activation=make_activation(activation),
            stem_pool=max_pool2d(3, 2, convention=convention),
        )
        prev_filters = 64
        unit_filters = [filters for filters, units in STAGES for _ in range(units)]
        for index, filters in enumerate(unit_filters):
            strides = 1 if filters == prev_filters else 2
            layers[f"unit_{index}"] = ResidualUnit(
                prev_filters, filters, strides, activation, convention, kernel_initializer
            )
            prev_filters = filters
        if num_classes:
            layers["avg_pool"] = GlobalAvgPool2d()
            layers["flatten"] = nn.Flatten()
            layers["classifier"] = Dense(prev_filters, num_classes, classifier_activation)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.classifier_activation = classifier_activation if num_classes else None
        self.activation_name = activation
        self.convention = convention
        for child in self.children():  # each unit initialised itself already
            if not isinstance(child, ResidualUnit):
                initialize_like_keras(child, kernel_initializer)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map after the last residual unit: (N, 512, H/32, W/32)."""
        for name, module in self.named_children():
            if name == "avg_pool":
                return x
            x = module(x)
        return x  # the trunk alone (num_classes=0)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """From ``forward_features``' map: the pooled features (``pre_logits``), else the logits, i.e. the Dense
        head without its activation (what a softmax head's probabilities are computed from)."""
        if not self.num_classes:
            raise ValueError("this ResNet34 has no head (num_classes=0): its output is forward_features'")
        x = self.flatten(self.avg_pool(x))
        return x if pre_logits else self.classifier.logits(x)

    def __getitem__(self, index: int | slice) -> nn.Module:
        # nn.Sequential rebuilds a slice with its own class, whose constructor is not ours: slices are plain.
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        return super().__getitem__(index)


# torchvision's (and timm's) resnet34 names for the twin's tensors: conv1/bn1/fc for the stem and head,
# layer{stage}.{block}.conv1/bn1/conv2/bn2/downsample.{0,1} for the units.
_UNIT_LAYER_NAMES = {"main_layers.0": "conv1", "main_layers.1": "bn1", "main_layers.3": "conv2", "main_layers.4": "bn2"}
_UNIT_LAYER_NAMES |= {"skip_layers.0": "downsample.0", "skip_layers.1": "downsample.1"}
_HEAD_NAMES = {"stem_conv": "conv1", "stem_bn": "bn1", "classifier": "fc"}


def _unit_blocks() -> list[tuple[int, int]]:
    return [(stage + 1, block) for stage, (_, units) in enumerate(STAGES) for block in range(units)]


def torchvision_key(twin_key: str) -> str:
    """torchvision's state_dict key for a twin's key: ``unit_3.main_layers.0.weight`` -> ``layer2.0.conv1.weight``."""
    layer, _, tensor = twin_key.rpartition(".")
    if layer in _HEAD_NAMES:
        return f"{_HEAD_NAMES[layer]}.{tensor}"
    match = re.fullmatch(r"unit_(\d+)\.(\w+\.\d)", layer)
    if not match or match.group(2) not in _UNIT_LAYER_NAMES:
        raise KeyError(twin_key)
    stage, block = _unit_blocks()[int(match.group(1))]
    return f"layer{stage}.{block}.{_UNIT_LAYER_NAMES[match.group(2)]}.{tensor}"


def twin_key_names(model: nn.Module) -> dict[str, str]:
    """{torchvision key: twin key} for every tensor of a twin ResNet34."""
    return {torchvision_key(key): key for key in model.state_dict()}
