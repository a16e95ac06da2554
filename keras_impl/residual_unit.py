"""The book's ResidualUnit (Géron, ch. 14) as a Keras 3 layer; mirrored by ``torch_impl/residual_unit.py``."""

from __future__ import annotations

from functools import partial

import keras

# The book's default convolution: 3x3, stride 1, TF "same" padding, He init, no bias (BN follows).
DefaultConv2D = partial(
    keras.layers.Conv2D, kernel_size=3, strides=1, padding="same", kernel_initializer="he_normal", use_bias=False
)


@keras.saving.register_keras_serializable(package="resnet34_parity")
class ResidualUnit(keras.layers.Layer):
    """Two 3x3 conv/BN layers plus a skip connection; a 1x1 conv/BN projection when strided.

    Args:
        filters: channels of the output.
        strides: stride of the first 3x3 conv and of the projection.
        activation: a Keras activation name, applied inside the main path and after the sum.
        **kwargs: passed to ``keras.layers.Layer`` (``name``, ``dtype``, ...).
    """

    def __init__(self, filters: int, strides: int = 1, activation: str = "relu", **kwargs) -> None:
        super().__init__(**kwargs)
        for name, value in (("filters", filters), ("strides", strides)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ResidualUnit needs a positive integer {name}. Received: {name}={value!r}")
        self.filters = filters
        self.strides = strides
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        dtype = self.dtype_policy  # sublayers do not inherit it by themselves
        self.main_layers = [
            DefaultConv2D(filters, strides=strides, dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
            keras.layers.Activation(activation, dtype=dtype),
            DefaultConv2D(filters, dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
        ]
        self.skip_layers = []
        if strides > 1:
            self.skip_layers = [
                DefaultConv2D(filters, kernel_size=1, strides=strides, dtype=dtype),
                keras.layers.BatchNormalization(dtype=dtype),
            ]

    def build(self, input_shape: tuple) -> None:
        # Built explicitly so a reloaded .keras file has every variable before its weights arrive.
        if self.strides == 1 and input_shape[-1] != self.filters:
            raise ValueError(
                "ResidualUnit with strides=1 adds its input unchanged, so its input must have `filters` "
                f"channels. Received: filters={self.filters}, input_shape={tuple(input_shape)}"
            )
        for layers in (self.main_layers, self.skip_layers):
            shape = input_shape
            for layer in layers:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)
        self.built = True

    def call(self, inputs):
        Z = inputs
        for layer in self.main_layers:
            Z = layer(Z)
        skip_Z = inputs
        for layer in self.skip_layers:
            skip_Z = layer(skip_Z)
        return self.activation(Z + skip_Z)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        shape = input_shape
        for layer in self.main_layers:
            shape = layer.compute_output_shape(shape)
        return shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides, activation=self.activation_name)
        return config
