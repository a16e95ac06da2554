"""The book's ResNet-34 in PyTorch (NCHW); mirrors ``keras_impl/resnet34.py`` layer for layer.

``ResNet34`` is an ``nn.Sequential`` whose children carry the Keras model's layer names, so
``keras_model.layers[i]`` and ``list(torch_model.named_children())[i]`` are the same layer.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from torch_impl.layers import Dense, GlobalAvgPool2d, batch_norm
from torch_impl.layers import activation as make_activation
from torch_impl.padding import Conv2dSame, MaxPool2dSame
from torch_impl.residual_unit import ResidualUnit

# (filters, units) per stage: 3/4/6/3 units of 64/128/256/512 filters.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))


class ResNet34(nn.Sequential):
    """ResNet-34 of Géron's ch. 14: 7x7/2 conv, BN, activation, 3x3/2 max-pool, 16 units, GAP, Dense.

    Args:
        num_classes: width of the Dense head.
        in_channels: channels of the input images.
        classifier_activation: Keras name of the head's activation; None gives logits.
        activation: Keras name of the activation used everywhere else (the book uses "relu").
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_activation: str | None = "softmax",
        activation: str = "relu",
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ResNet34 needs a positive integer num_classes. Received: num_classes={num_classes!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem_conv=Conv2dSame(in_channels, 64, 7, stride=2),
            stem_bn=batch_norm(64),
            stem_activation=make_activation(activation),
            stem_pool=MaxPool2dSame(3, stride=2),
        )
        prev_filters = 64
        unit_filters = [filters for filters, units in STAGES for _ in range(units)]
        for index, filters in enumerate(unit_filters):
            strides = 1 if filters == prev_filters else 2
            layers[f"unit_{index}"] = ResidualUnit(prev_filters, filters, strides, activation)
            prev_filters = filters
        layers["avg_pool"] = GlobalAvgPool2d()
        layers["flatten"] = nn.Flatten()
        layers["classifier"] = Dense(prev_filters, num_classes, classifier_activation)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.classifier_activation = classifier_activation
        self.activation_name = activation
