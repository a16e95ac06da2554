"""The book's ResidualUnit (Géron, ch. 14) as a Keras 3 layer; mirrored by ``torch_impl/residual_unit.py``."""

from __future__ import annotations

import keras

from keras_impl.layers import batch_norm
from keras_impl.padding import check_convention, conv2d

# The book's code takes Keras's default kernel initialiser; its DefaultConv2D variant used He normal.
KERNEL_INITIALIZERS = ("glorot_uniform", "he_normal")


@keras.saving.register_keras_serializable(package="resnet34_parity")
class ResidualUnit(keras.layers.Layer):
    """Two 3x3 conv/BN layers plus a skip connection; a 1x1 conv/BN projection when strided.

    Args:
        filters: channels of the output.
        strides: stride of the first 3x3 conv and of the projection.
        activation: a Keras activation name, applied inside the main path and after the sum.
        convention: "book" (TF "same" padding, BatchNorm epsilon 1e-3, momentum 0.99) or "torchvision"
            (symmetric padding, epsilon 1e-5, momentum 0.9).
        kernel_initializer: "glorot_uniform" (Keras's default, the book's) or "he_normal".
        **kwargs: passed to ``keras.layers.Layer`` (``name``, ``dtype``, ...).
    """

    def __init__(
        self,
        filters: int,
        strides: int = 1,
        activation: str = "relu",
        convention: str = "book",
        kernel_initializer: str = "glorot_uniform",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("filters", filters), ("strides", strides)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ResidualUnit needs a positive integer {name}. Received: {name}={value!r}")
        if kernel_initializer not in KERNEL_INITIALIZERS:
            raise ValueError(
                f"ResidualUnit supports kernel_initializer in {KERNEL_INITIALIZERS}. "
                f"Received: kernel_initializer={kernel_initializer!r}"
            )
        self.filters = filters
        self.strides = strides
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.convention = check_convention(convention)
        self.kernel_initializer = kernel_initializer
        # Sublayers do not inherit the dtype policy by themselves.
        common = {"dtype": self.dtype_policy, "convention": convention}
        conv = {**common, "kernel_initializer": kernel_initializer}
        # Named by their place, not by Keras's process-wide counters (conv2d_35): every build then gives its variables
        # the same paths, and TensorFlow creates a variable whose path it has seen before ~25x faster.
        self.main_layers = [
            conv2d(filters, 3, strides, name="main_conv_0", **conv),
            batch_norm(name="main_bn_0", **common),
            keras.layers.Activation(activation, name="main_activation", dtype=self.dtype_policy),
            conv2d(filters, 3, name="main_conv_1", **conv),
            batch_norm(name="main_bn_1", **common),
        ]
        self.skip_layers = []
        if strides > 1:
            self.skip_layers = [
                conv2d(filters, 1, strides, name="skip_conv", **conv),
                batch_norm(name="skip_bn", **common),
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
        config.update(
            filters=self.filters,
            strides=self.strides,
            activation=self.activation_name,
            convention=self.convention,
            kernel_initializer=self.kernel_initializer,
        )
        return config
