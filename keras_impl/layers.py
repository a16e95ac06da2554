"""Per-convention BatchNormalization for the Keras model; mirrored by ``torch_impl/layers.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras

from keras_impl.padding import check_convention

# book: Keras's defaults, what the book's code computes. torchvision: torch's eps 1e-5 and momentum 0.1,
# which is 0.9 in Keras's convention (Keras weighs the OLD statistic, torch the new batch).
BATCH_NORM = {"book": {"epsilon": 1e-3, "momentum": 0.99}, "torchvision": {"epsilon": 1e-5, "momentum": 0.9}}


def batch_norm(*, convention: str = "book", **kwargs) -> keras.layers.BatchNormalization:
    """``BatchNormalization`` with the epsilon and momentum of ``convention``."""
    return keras.layers.BatchNormalization(**BATCH_NORM[check_convention(convention)], **kwargs)


@contextlib.contextmanager
def kernels_left_at_zero() -> Iterator[Callable[[keras.layers.Layer], keras.layers.Layer]]:
    """Inside, ``zero(layer)`` makes an unbuilt layer and its sublayers create their kernels as zeros when they are
    built, not drawn from their random initialisers; on exit every initialiser is put back, so configs and saved
    files are what a normal build gives. For a model whose every weight is assigned next (a converted or cloned
    one): the draws are about half of a ResNet-34 build (float64: ~0.55 s -> ~0.27 s here)."""
    swapped: list[tuple[keras.layers.Layer, keras.initializers.Initializer]] = []

    def zero(layer: keras.layers.Layer) -> keras.layers.Layer:
        if not isinstance(layer, keras.layers.Layer):  # keras.Input's tensor
            return layer
        for sublayer in layer._flatten_layers(include_self=True, recursive=True):
            initializer = getattr(sublayer, "kernel_initializer", None)
            if isinstance(initializer, keras.initializers.Initializer):  # ResidualUnit's own is a name: left alone
                swapped.append((sublayer, initializer))
                sublayer.kernel_initializer = keras.initializers.Zeros()
        return layer

    try:
        yield zero
    finally:
        for sublayer, initializer in swapped:
            sublayer.kernel_initializer = initializer


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
    initialisers, such as an optimizer's, are left alone). For code that builds layers it does not make itself and
    overwrites every weight next: Keras's ``load_model`` builds the whole model before it reads the file, and
    keras-hub's ResNet draws its kernels as it is made. Configs keep their initialisers. Not thread-safe: it swaps
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
