"""Per-convention BatchNormalization for the Keras model; mirrored by ``torch_impl/layers.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from keras_impl.padding import check_convention

# book: Keras's defaults, what the book's code computes. torchvision: torch's eps 1e-5 and momentum 0.1,
# which is 0.9 in Keras's convention (Keras weighs the OLD statistic, torch the new batch).
BATCH_NORM = {"book": {"epsilon": 1e-3, "momentum": 0.99}, "torchvision": {"epsilon": 1e-5, "momentum": 0.9}}


def batch_norm(*, convention: str = "book", **kwargs) -> keras.layers.BatchNormalization:
    """``BatchNormalization`` with the epsilon and momentum of ``convention``."""
    return keras.layers.BatchNormalization(**BATCH_NORM[check_convention(convention)], **kwargs)


# Keras's random initialisers (He and Glorot are VarianceScaling): drawing them is most of a ResNet-34 build's time.
_RANDOM_INITIALIZERS = (
    keras.initializers.VarianceScaling,
    keras.initializers.RandomNormal,
    keras.initializers.RandomUniform,
    keras.initializers.TruncatedNormal,
    keras.initializers.Orthogonal,
)


@contextlib.contextmanager
def random_draws_skipped() -> Iterator[None]:
    """Inside, a Keras variable whose initialiser is random starts at zero instead of being drawn (constant
    initialisers, such as an optimizer's, are left alone). For a model whose every weight is assigned next: the
    converter's and the loaders' builds (``build_resnet34(initialize_weights=False)``), the floor clones, Keras's
    ``load_model`` (it builds the whole model before it reads the file) and keras-hub's ResNet (it draws its kernels
    as it is made). Configs and saved files keep their initialisers. Not thread-safe: it swaps
    a method of the backend's Variable class for the duration (float64 ``.keras`` load here: 2.0 s -> 1.6 s)."""
    variable_class = keras.Variable
    initialize = variable_class._initialize_with_initializer

    def initialize_random_at_zero(variable: keras.Variable, initializer: object) -> None:
        if isinstance(initializer, _RANDOM_INITIALIZERS):
            initializer = keras.initializers.Zeros()
        initialize(variable, initializer)

    variable_class._initialize_with_initializer = initialize_random_at_zero
    try:
        yield
    finally:
        variable_class._initialize_with_initializer = initialize
