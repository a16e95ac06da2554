"""Seeded hostile weights: a freshly initialised model (BN mean 0, variance 1) hides most porting bugs.

BatchNorm statistics are far from the defaults: means of magnitude 0.5-2, variances log-uniform over
[0.05, 20], and a quarter of the channels with variances in [5e-4, 2e-3], where using torch's epsilon
(1e-5) instead of Keras's (1e-3) changes the scale by ~20-40%. gamma is drawn as g * sqrt(var + 1e-3)
with g in [0.3, 1.2], so each channel's gain stays O(1) and the logits stay finite through 16 units.
"""

from __future__ import annotations

import keras
import numpy as np

LOW_VARIANCE_FRACTION = 0.25


def randomize_weights(obj: keras.layers.Layer, seed: int = 0) -> None:
    """Overwrite every weight of a Keras ResNet-34 or ResidualUnit with seeded hostile values."""
    rng = np.random.default_rng(seed)
    layers = obj._flatten_layers(include_self=True, recursive=True)
    for layer in layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, fan_in, filters = layer.kernel.shape
            std = np.sqrt(2.0 / (kh * kw * fan_in))  # He normal, as the book's initialiser
            _assign(layer.kernel, rng.normal(0.0, std, size=(kh, kw, fan_in, filters)))
        elif isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            variance = np.exp(rng.uniform(np.log(0.05), np.log(20.0), size=channels))
            low = rng.permutation(channels)[: int(channels * LOW_VARIANCE_FRACTION)]
            variance[low] = rng.uniform(5e-4, 2e-3, size=low.size)
            mean = rng.choice([-1.0, 1.0], size=channels) * rng.uniform(0.5, 2.0, size=channels)
            gamma = rng.uniform(0.3, 1.2, size=channels) * np.sqrt(variance + 1e-3)
            beta = rng.normal(0.0, 0.5, size=channels)
            for variable, value in zip(
                (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                (gamma, beta, mean, variance),
                strict=True,
            ):
                _assign(variable, value)
        elif isinstance(layer, keras.layers.Dense):
            fan_in, units = layer.kernel.shape
            _assign(layer.kernel, rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(fan_in, units)))
            _assign(layer.bias, rng.normal(0.0, 0.1, size=units))


def _assign(variable: keras.Variable, value: np.ndarray) -> None:
    variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))
