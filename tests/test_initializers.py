"""The torch twin starts from Keras's initial distribution: per layer, its weights and a Keras layer's freshly
initialised weights pass a two-sample Kolmogorov-Smirnov test and a std/bounds check; torch's own default
initialisation fails the same test.

The draws are seeded, so the verdicts are deterministic; the KS threshold p >= 1e-4 per layer keeps the chance
that a correct initialiser fails ANY of the ~76 layer tests below ~1% for an unseeded draw.
"""

from __future__ import annotations

import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

# isort: split
import math

import keras
import numpy as np
import pytest
import torch
from torch import nn

import torch_impl
from torch_impl.initializers import initialize_like_keras

P_THRESHOLD = 1e-4
MAX_SAMPLES = 40_000  # per layer and side: enough power (D_crit ~ 0.014) and fast
KERAS_INITIALIZERS = {"glorot_uniform": keras.initializers.GlorotUniform, "he_normal": keras.initializers.HeNormal}


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (no scipy here)."""
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    both = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, both, "right") / a.size - np.searchsorted(b, both, "right") / b.size).max())
    en = math.sqrt(a.size * b.size / (a.size + b.size))
    lam = (en + 0.12 + 0.11 / en) * d  # Stephens' correction, as in Numerical Recipes' probks
    if lam < 0.2:
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(max(p, 0.0), 1.0)


def _keras_weights(module: nn.Module, initializer: str, seed: int) -> np.ndarray:
    """The kernel of a freshly built Keras layer of the same shape and initializer."""
    if isinstance(module, nn.Conv2d):
        out_channels, in_channels, kh, kw = module.weight.shape
        layer = keras.layers.Conv2D(out_channels, (kh, kw), kernel_initializer=KERAS_INITIALIZERS[initializer](seed))
        layer.build((None, None, None, in_channels))
    else:
        layer = keras.layers.Dense(module.out_features, kernel_initializer=KERAS_INITIALIZERS[initializer](seed))
        layer.build((None, module.in_features))
    return keras.ops.convert_to_numpy(layer.kernel)


def _subsample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    values = values.ravel().astype(np.float64)
    return values if values.size <= MAX_SAMPLES else rng.choice(values, MAX_SAMPLES, replace=False)


def mismatched_layers(model: nn.Module, initializer: str, dense_initializer: str = "glorot_uniform") -> list[str]:
    """Layers whose weights are NOT distributed as Keras's ``initializer`` draws them (KS, std, bounds)."""
    rng = np.random.default_rng(0)
    failures = []
    for index, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        kind = initializer if isinstance(module, nn.Conv2d) else dense_initializer
        ours = _subsample(module.weight.detach().numpy(), rng)
        theirs = _subsample(_keras_weights(module, kind, seed=index), rng)
        fan_in = math.prod(module.weight.shape[1:])
        fan_out = module.weight.shape[0] * math.prod(module.weight.shape[2:])
        if kind == "glorot_uniform":
            std, bound = math.sqrt(2.0 / (fan_in + fan_out)), math.sqrt(6.0 / (fan_in + fan_out))
        else:  # he_normal: the kept values have stddev sqrt(2/fan_in), cut at 2 / 0.8796 of it
            std = math.sqrt(2.0 / fan_in)
            bound = 2 * std / 0.87962566103423978
        _, p = ks_2samp(ours, theirs)
        # 5% on the std is > 7 standard errors for the smallest layer here (5120 values)
        if p < P_THRESHOLD or abs(ours.std() / std - 1) > 0.05 or np.abs(ours).max() > bound * (1 + 1e-6):
            failures.append(f"{name}: KS p={p:.2g}, std {ours.std():.4g} vs {std:.4g}")
    return failures


def torch_default_init(model: nn.Module) -> nn.Module:
    """torch's own initialisation of every layer (kaiming_uniform with a=sqrt(5), uniform biases)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
            module.reset_parameters()
    return model


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """One torch twin, re-initialised by each test."""
    return torch_impl.ResNet34(10, classifier_activation="softmax")


@pytest.mark.parametrize("initializer", ["glorot_uniform", "he_normal"])
def test_twin_weights_come_from_keras_distribution(model, initializer):
    initialize_like_keras(model, initializer, seed=1)
    assert mismatched_layers(model, initializer) == []
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, value in ((module.weight, 1), (module.bias, 0), (module.running_mean, 0)):
                assert torch.all(tensor == value)
            assert torch.all(module.running_var == 1)
    assert torch.all(model.classifier.bias == 0)


def test_constructor_initialises_like_keras():
    """``torch_impl.ResNet34(kernel_initializer=...)`` draws as Keras does (glorot_uniform by default, as the book)."""
    assert mismatched_layers(torch_impl.ResNet34(10, kernel_initializer="he_normal"), "he_normal") == []


@pytest.mark.parametrize("initializer", ["glorot_uniform", "he_normal"])
def test_torch_default_init_fails_the_same_test(model, initializer):
    default = torch_default_init(model)
    convs_and_dense = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in default.modules())
    assert len(mismatched_layers(default, initializer)) == convs_and_dense


def test_seed_reproduces_and_float64_stays_float64():
    a, b = torch_impl.ResidualUnit(8, 16, 2).double(), torch_impl.ResidualUnit(8, 16, 2).double()
    initialize_like_keras(a, "he_normal", seed=3)
    initialize_like_keras(b, "he_normal", seed=3)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert a.main_layers[0].weight.dtype == torch.float64


def test_unknown_initializer_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"glorot_uniform.*he_normal"):
        initialize_like_keras(torch_impl.ResidualUnit(4, 4), "orthogonal")


@pytest.mark.parametrize("initializer", list(KERAS_INITIALIZERS))
def test_a_build_left_uninitialised_has_the_normal_config_and_zero_kernels(initializer):
    """``initialize_weights=False`` (the converter's, the loaders' and the floor clones' builds: every weight is
    assigned next) skips the random draws, about half of a build; what is saved must not show it."""
    import conversion

    normal = keras_impl.build_resnet34(10, (None, None, 3), None, "float32", kernel_initializer=initializer)
    quick = keras_impl.build_resnet34(
        10, (None, None, 3), None, "float32", kernel_initializer=initializer, initialize_weights=False
    )
    assert quick.get_config() == normal.get_config()
    # The units name their sublayers by place: two builds give the same variable paths (TensorFlow creates a variable
    # whose path it has seen ~25x faster).
    assert [v.path for v in quick.weights] == [v.path for v in normal.weights]
    assert "resnet34/unit_7/skip_conv/kernel" in {v.path for v in quick.weights}
    kernels = [v for v in quick.weights if v.path.endswith("/kernel")]
    assert len(kernels) == 37 and not any(np.any(keras.ops.convert_to_numpy(k)) for k in kernels)
    if initializer == "glorot_uniform":  # the converter's Keras model, as a user saves it
        twin = torch_impl.ResNet34(num_classes=10, classifier_activation=None)
        converted = conversion.torch_to_keras(twin, (None, None, 3))
        assert converted.get_config() == normal.get_config()


def test_layers_built_with_random_draws_skipped_start_at_zero_and_keep_their_configs():
    """What the converter's builds, the floor clones, ``load_keras`` and the keras-hub conversion build under (every
    weight is overwritten next): random initialisers give zeros, constant ones (BatchNorm's, an optimizer's) their
    values, and the configs and the backend's Variable are as before on exit."""
    from keras_impl.layers import random_draws_skipped

    initialize = keras.Variable._initialize_with_initializer
    layers = {
        "he": keras.layers.Conv2D(4, 3, kernel_initializer="he_normal"),
        "glorot": keras.layers.Dense(4),
        "normal": keras.layers.Dense(4, kernel_initializer=keras.initializers.RandomNormal(stddev=5.0)),
        "bn": keras.layers.BatchNormalization(),
    }
    with random_draws_skipped():
        for name, layer in layers.items():
            layer.build((None, 5, 5, 3) if name == "he" else (None, 3))
    assert keras.Variable._initialize_with_initializer is initialize
    for name in ("he", "glorot", "normal"):
        assert not np.any(keras.ops.convert_to_numpy(layers[name].kernel)), name
    assert layers["he"].get_config()["kernel_initializer"]["class_name"] == "HeNormal"
    assert np.all(keras.ops.convert_to_numpy(layers["bn"].gamma) == 1)
    assert np.all(keras.ops.convert_to_numpy(layers["bn"].moving_variance) == 1)
    drawn = keras.layers.Dense(4)
    drawn.build((None, 3))
    assert np.any(keras.ops.convert_to_numpy(drawn.kernel))
