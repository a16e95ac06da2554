"""The chapter's ResNet-34 as a reader on Keras 2 types it (Géron, *Hands-On Machine Learning*, 3rd ed., ch. 14).

The book's own code, unchanged but for the import: on TensorFlow 2.16+ ``tf.keras`` is Keras 3, so a reader who
stays on Keras 2 imports ``tf_keras`` (the ``tf-keras`` package) where the book writes ``tf.keras``. Keras 2 takes
``padding="SAME"`` in upper case, as the book writes it. Tests use it as code nobody here wrote, to get files that
Keras 2 itself writes (``model.save("x.h5")``, ``model.save_weights("x.h5")``).
"""

from functools import partial

import tf_keras

DefaultConv2D = partial(tf_keras.layers.Conv2D, kernel_size=3, strides=1, padding="SAME", use_bias=False)


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

    def get_config(self):  # Keras 2 needs it to save the model; the book's notebook adds the same three arguments
        return {
            **super().get_config(),
            "filters": self.main_layers[0].filters,
            "strides": self.main_layers[0].strides[0],
            "activation": tf_keras.activations.serialize(self.activation),
        }


def build_book_model(input_shape=(224, 224, 3), num_classes=10, dtype="float32"):
    """The chapter's Sequential model; ``dtype`` sets Keras 2's floatx while building, as a reader would."""
    previous = tf_keras.backend.floatx()
    tf_keras.backend.set_floatx(dtype)
    try:
        model = tf_keras.Sequential(
            [
                DefaultConv2D(64, kernel_size=7, strides=2, input_shape=input_shape),
                tf_keras.layers.BatchNormalization(),
                tf_keras.layers.Activation("relu"),
                tf_keras.layers.MaxPool2D(pool_size=3, strides=2, padding="SAME"),
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
        tf_keras.backend.set_floatx(previous)
    return model
