"""The book's ResNet-34 as a Keras 3 Sequential model; mirrored by ``torch_impl/resnet34.py``.

Layers are named (``stem_conv`` ... ``unit_0`` ... ``unit_15`` ... ``classifier``) so the PyTorch twin can
carry the same names and the converter can pair them one to one.
"""

from __future__ import annotations

import keras

from keras_impl.residual_unit import DefaultConv2D, ResidualUnit

# (filters, units) per stage: 3/4/6/3 units of 64/128/256/512 filters.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))


def build_resnet34(
    num_classes: int = 10,
    input_shape: tuple = (224, 224, 3),
    classifier_activation: str | None = "softmax",
    dtype: str | None = None,
    *,
    activation: str = "relu",
) -> keras.Model:
    """The book's ResNet-34: 21,306,826 parameters for 10 classes at 224x224x3.

    Args:
        num_classes: width of the Dense head.
        input_shape: (height, width, channels); height and width may be None.
        classifier_activation: activation of the head; None gives logits.
        dtype: a Keras dtype or dtype policy ("float64", "mixed_bfloat16"); None takes Keras's floatx.
        activation: activation used everywhere else (the book uses "relu").
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"build_resnet34 needs a positive integer num_classes. Received: num_classes={num_classes!r}")
    if len(input_shape) != 3 or input_shape[-1] is None:
        raise ValueError(
            f"build_resnet34 needs input_shape=(height, width, channels) with channels known. "
            f"Received: input_shape={input_shape!r}"
        )
    policy = keras.dtype_policies.get(dtype or keras.config.floatx())
    layers = [
        keras.Input(shape=tuple(input_shape), dtype=policy.variable_dtype, name="images"),
        DefaultConv2D(64, kernel_size=7, strides=2, name="stem_conv", dtype=policy),
        keras.layers.BatchNormalization(name="stem_bn", dtype=policy),
        keras.layers.Activation(activation, name="stem_activation", dtype=policy),
        keras.layers.MaxPool2D(pool_size=3, strides=2, padding="same", name="stem_pool", dtype=policy),
    ]
    prev_filters = 64
    unit_filters = [filters for filters, units in STAGES for _ in range(units)]
    for index, filters in enumerate(unit_filters):
        strides = 1 if filters == prev_filters else 2
        layers.append(ResidualUnit(filters, strides=strides, activation=activation, name=f"unit_{index}", dtype=policy))
        prev_filters = filters
    layers += [
        keras.layers.GlobalAvgPool2D(name="avg_pool", dtype=policy),
        keras.layers.Flatten(name="flatten", dtype=policy),
        keras.layers.Dense(num_classes, activation=classifier_activation, name="classifier", dtype=policy),
    ]
    return keras.Sequential(layers, name="resnet34")
