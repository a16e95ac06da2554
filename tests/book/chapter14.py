"""The chapter's ResNet-34 as a reader types it (Géron, *Hands-On Machine Learning*, 3rd ed., ch. 14).

Nothing here is project code: it is the book's own, with the one change Keras 3 forces (MaxPool2D refuses
padding="SAME" in upper case, so a reader on Keras 3 writes "same"). The ``ResidualUnit`` puts the activation
FUNCTION in ``main_layers`` and defines no ``get_config``; layers are auto-named (``conv2d``, ``residual_unit_7``)
and kernels take Keras's default initialiser. Tests use it as code nobody here wrote.
"""

from functools import partial

import keras as tf_keras  # the book writes `tf.keras`; Keras 3 is the same API under `keras`

DefaultConv2D = partial(tf_keras.layers.Conv2D, kernel_size=3, strides=1, padding="same", use_bias=False)


class ResidualUnit(tf_keras.layers.Layer):
    def __init__(self, filters, strides=1, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.activation = tf_keras.activations.get(activation)
        self.main_layers = [
            DefaultConv2D(filters, strides=strides),
            tf_keras.layers.BatchNormalization(),
            self.activation,
            DefaultConv2D(filters),
            tf_keras.layers.BatchNormalization(),
        ]
        self.skip_layers = []
        if strides > 1:
            self.skip_layers = [
                DefaultConv2D(filters, kernel_size=1, strides=strides),
                tf_keras.layers.BatchNormalization(),
            ]

    def call(self, inputs):
        Z = inputs
        for layer in self.main_layers:
            Z = layer(Z)
        skip_Z = inputs
        for layer in self.skip_layers:
            skip_Z = layer(skip_Z)
        return self.activation(Z + skip_Z)


def build_book_model(input_shape=(224, 224, 3), num_classes=10, dtype="float32"):
    """The chapter's Sequential model. ``dtype`` is the only addition: like a reader who starts a session with
    ``keras.config.set_floatx``, it sets Keras's floatx and global dtype policy while building (the book's
    sublayers take no ``dtype`` argument; Keras caches its policy from floatx once, hence both)."""
    previous = tf_keras.config.floatx(), tf_keras.config.dtype_policy()
    tf_keras.config.set_floatx(dtype)
    tf_keras.config.set_dtype_policy(dtype)
    try:
        model = tf_keras.Sequential(
            [
                tf_keras.Input(shape=input_shape),
                DefaultConv2D(64, kernel_size=7, strides=2),
                tf_keras.layers.BatchNormalization(),
                tf_keras.layers.Activation("relu"),
                tf_keras.layers.MaxPool2D(pool_size=3, strides=2, padding="same"),
            ]
        )
        prev_filters = 64
        for filters in [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3:
            strides = 1 if filters == prev_filters else 2
            model.add(ResidualUnit(filters, strides=strides))
            prev_filters = filters
        model.add(tf_keras.layers.GlobalAvgPool2D())
        model.add(tf_keras.layers.Flatten())
        model.add(tf_keras.layers.Dense(num_classes, activation="softmax"))
    finally:
        tf_keras.config.set_floatx(previous[0])
        tf_keras.config.set_dtype_policy(previous[1])
    return model
