"""Initialise a torch twin as Keras initialises its layers, so training from scratch starts from the same
distribution in either framework.

Read from keras/src/initializers/random_initializers.py (Keras 3.15): both are ``VarianceScaling``.

- ``glorot_uniform``: U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out)).
- ``he_normal``: a normal of stddev sqrt(2 / fan_in) / 0.87962566103423978, TRUNCATED at two of those
  stddevs (values beyond are redrawn), so the kept values have stddev sqrt(2 / fan_in).

Keras's fans of a conv kernel (kh, kw, in, out) are kh*kw*in and kh*kw*out; a torch weight (out, in, kh, kw)
gives the same numbers (torch's ``_calculate_fan_in_and_fan_out``), and a Dense kernel (in, out) / Linear
weight (out, in) gives in and out in both. torch's own defaults differ: kaiming_uniform with a=sqrt(5)
(U(+-1/sqrt(fan_in))) for weights and a non-zero uniform bias.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# stddev of a standard normal truncated to [-2, 2] (Keras divides by it so the kept values have the target std)
_TRUNCATED_STD = 0.87962566103423978
SUPPORTED = ("glorot_uniform", "he_normal")


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive_field = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive_field, weight.shape[0] * receptive_field


def _draw(weight: torch.Tensor, initializer: str, generator: torch.Generator | None) -> None:
    fan_in, fan_out = _fans(weight)
    if initializer == "glorot_uniform":
        limit = math.sqrt(6.0 / max(1.0, fan_in + fan_out))
        nn.init.uniform_(weight, -limit, limit, generator=generator)
    else:  # he_normal
        std = math.sqrt(2.0 / max(1.0, fan_in)) / _TRUNCATED_STD
        nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)


def _check(name: str, initializer: str) -> None:
    if initializer not in SUPPORTED:
        raise ValueError(f"Unsupported {name}; expected one of {list(SUPPORTED)}. Received: {initializer!r}")


@torch.no_grad()
def initialize_like_keras(
    module: nn.Module,
    kernel_initializer: str = "glorot_uniform",
    seed: int | None = None,
    *,
    dense_initializer: str | None = "glorot_uniform",
) -> None:
    """Draw every conv/Dense weight of ``module`` as Keras would; zero biases; BatchNorm (1, 0, 0, 1).

    ``kernel_initializer`` is the conv kernels'; ``dense_initializer`` the Dense head's (Keras's Dense default,
    glorot_uniform, as in the book, where only the convs name one; None: the same as the convs).
    ``seed`` makes the draw reproducible (torch's generator, not Keras's stream: the same distribution, not
    the same numbers).
    """
    dense_initializer = kernel_initializer if dense_initializer is None else dense_initializer
    _check("kernel_initializer", kernel_initializer)
    _check("dense_initializer", dense_initializer)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            # CPU generator: draw on the CPU, then copy (a CUDA weight cannot take a CPU generator)
            weight = torch.empty(layer.weight.shape, dtype=layer.weight.dtype)
            _draw(weight, kernel_initializer if isinstance(layer, nn.Conv2d) else dense_initializer, generator)
            layer.weight.copy_(weight)
            if layer.bias is not None:
                layer.bias.zero_()  # Keras's bias_initializer="zeros"
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.reset_parameters()  # gamma 1, beta 0, moving mean 0, moving variance 1, counter 0
