"""The book's ResNet-34 as a Keras 3 Sequential model; mirrored by ``torch_impl/resnet34.py``.

Layers are named (``stem_conv`` ... ``unit_0`` ... ``unit_15`` ... ``classifier``) so the PyTorch twin can
carry the same names and the converter can pair them one to one.
"""

from __future__ import annotations

import keras

from keras_impl.layers import batch_norm, random_draws_skipped
from keras_impl.padding import check_convention, conv2d, max_pool2d
from keras_impl.residual_unit import ResidualUnit

# (filters, units) per stage: 3/4/6/3 units of 64/128/256/512 filters.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))


def build_resnet34(
    num_classes: int = 10,
    input_shape: tuple = (224, 224, 3),
    classifier_activation: str | None = "softmax",
    dtype: str | None = None,
    *,
    activation: str = "relu",
    convention: str = "book",
    kernel_initializer: str = "glorot_uniform",
    initialize_weights: bool = True,
) -> keras.Model:
    """The book's ResNet-34: 21,306,826 parameters for 10 classes at 224x224x3.

    Args:
        num_classes: width of the Dense head; 0 leaves out the head (pooling and Dense): the trunk alone, whose
            output is the feature map, like keras-hub's ResNetBackbone.
        input_shape: (height, width, channels); height and width may be None.
        classifier_activation: activation of the head; None gives logits.
        dtype: a Keras dtype or dtype policy ("float64", "mixed_bfloat16"); None takes Keras's floatx.
        activation: activation used everywhere else (the book uses "relu").
        convention: "book" (TF "same" padding, BatchNorm epsilon 1e-3 and momentum 0.99: what the book's code
            computes) or "torchvision" (symmetric padding, epsilon 1e-5, momentum 0.9: what torchvision and timm
            compute, so their checkpoints keep their logits).
        kernel_initializer: "glorot_uniform" (Keras's default, as in the book's code) or "he_normal".
        initialize_weights: False leaves the kernels at zero instead of drawing them (the config still names
            ``kernel_initializer``): for a model whose every weight is assigned next, as the converter does.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(
            f"build_resnet34 needs an integer num_classes >= 0 (0: no head). Received: num_classes={num_classes!r}"
        )
    if len(input_shape) != 3 or input_shape[-1] is None:
        raise ValueError(
            f"build_resnet34 needs input_shape=(height, width, channels) with channels known. "
            f"Received: input_shape={input_shape!r}"
        )
    check_convention(convention)
    policy = keras.dtype_policies.get(dtype or keras.config.floatx())
    common = {"dtype": policy, "convention": convention}
    layers = [
        keras.Input(shape=tuple(input_shape), dtype=policy.variable_dtype, name="images"),
        conv2d(64, 7, 2, name="stem_conv", kernel_initializer=kernel_initializer, **common),
        batch_norm(name="stem_bn", **common),
        keras.layers.Activation(activation, name="stem_activation", dtype=policy),
        max_pool2d(3, 2, name="stem_pool", **common),
    ]
    prev_filters = 64
    unit_filters = [filters for filters, units in STAGES for _ in range(units)]
    for index, filters in enumerate(unit_filters):
        strides = 1 if filters == prev_filters else 2
        layers.append(
            ResidualUnit(
                filters,
                strides,
                activation,
                convention,
                kernel_initializer,
                name=f"unit_{index}",
                dtype=policy,
            )
        )
        prev_filters = filters
    if num_classes:
        layers += [
            keras.layers.GlobalAvgPool2D(name="avg_pool", dtype=policy),
            keras.layers.Flatten(name="flatten", dtype=policy),
            keras.layers.Dense(num_classes, activation=classifier_activation, name="classifier", dtype=policy),
        ]
    name = "resnet34" if num_classes else "resnet34_trunk"
    if initialize_weights:
        return keras.Sequential(layers, name=name)
    with random_draws_skipped():  # the Sequential builds its layers as it is made
        return keras.Sequential(layers, name=name)
