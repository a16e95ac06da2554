"""The stages ``verify`` compares (stem, 16 units, pooled features, logits, output), run in either framework.

Every stage function takes and returns NHWC numpy arrays (2-D after pooling), so the two frameworks line up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import keras
import numpy as np
import torch
from torch import nn

from conversion.arrays import nchw_to_nhwc, nhwc_to_nchw
from conversion.structure import UNIT_COUNT

STEM_LAYERS = ("stem_conv", "stem_bn", "stem_activation", "stem_pool")
POOL_LAYERS = ("avg_pool", "flatten")

StageFunction = Callable[[np.ndarray], np.ndarray]


def model_dtype(keras_model: keras.Model) -> str:
    """The dtype of a Keras model's weights ("float32", "float64")."""
    return keras.backend.standardize_dtype(keras_model.weights[0].dtype)


def keras_stages(model: keras.Model) -> list[tuple[str, StageFunction]]:
    """(name, function) for each stage of a Keras ResNet-34 in ``build_resnet34``'s layout; "output" only where
    the head has an activation."""
    layer = model.get_layer

    def chain(*layers: keras.layers.Layer) -> StageFunction:
        def run(x: np.ndarray) -> np.ndarray:
            for each in layers:
                x = each(x)
            return keras.ops.convert_to_numpy(x)

        return run

    head = layer("classifier")
    stages = [("stem", chain(*(layer(name) for name in STEM_LAYERS)))]
    stages += [(f"unit_{i}", chain(layer(f"unit_{i}"))) for i in range(UNIT_COUNT)]
    stages.append(("pooled", chain(*(layer(name) for name in POOL_LAYERS))))
    stages.append(("logits", lambda x: keras.ops.convert_to_numpy(keras.ops.matmul(x, head.kernel) + head.bias)))
    if keras.activations.serialize(head.activation) != "linear":
        stages.append(("output", lambda x: keras.ops.convert_to_numpy(head.activation(keras.ops.convert_to_tensor(x)))))
    return stages


def as_torch(x_nhwc: np.ndarray) -> torch.Tensor:
    """An NHWC array as an NCHW tensor (2-D arrays as they are)."""
    return torch.from_numpy(nhwc_to_nchw(x_nhwc) if x_nhwc.ndim == 4 else np.ascontiguousarray(x_nhwc))


def run_torch(module: nn.Module | Callable, x: np.ndarray) -> np.ndarray:
    """``module`` on an NHWC array, back to NHWC."""
    with torch.no_grad():
        out = module(as_torch(x)).numpy()
    return nchw_to_nhwc(out) if out.ndim == 4 else out


def torch_stages(model: nn.Module, stage_names: Sequence[str]) -> list[tuple[str, StageFunction]]:
    """The same stages for a torch ResNet34 (the twin, or a copy of it with a planted bug)."""
    children = dict(model.named_children())

    def run_modules(*modules: nn.Module | Callable) -> StageFunction:
        def run(x: np.ndarray) -> np.ndarray:
            t = as_torch(x)
            with torch.no_grad():
                for module in modules:
                    t = module(t)
            out = t.numpy()
            return nchw_to_nhwc(out) if out.ndim == 4 else out

        return run

    head = children["classifier"]
    stages = {"stem": run_modules(*(children[name] for name in STEM_LAYERS))}
    stages.update({f"unit_{i}": run_modules(children[f"unit_{i}"]) for i in range(UNIT_COUNT)})
    stages["pooled"] = run_modules(*(children[name] for name in POOL_LAYERS))
    stages["logits"] = run_modules(head.logits)  # the Dense head without its activation
    stages["output"] = run_modules(head.activation)
    return [(name, stages[name]) for name in stage_names]


def sublayers(stage: str, keras_model: keras.Model, torch_model: nn.Module) -> list[tuple[str, object, object]]:
    """(path, keras layer, torch module) pairs in forward order inside one stage (none for pooled/logits/output)."""
    if stage == "stem":
        return [(n, keras_model.get_layer(n), getattr(torch_model, n)) for n in STEM_LAYERS]
    if stage.startswith("unit_"):
        k_unit, t_unit = keras_model.get_layer(stage), getattr(torch_model, stage)
        return [
            (f"{branch}.{i}", k_layer, t_layers[i] if i < len(t_layers) else None)
            for branch in ("main_layers", "skip_layers")
            for t_layers in [getattr(t_unit, branch)]
            for i, k_layer in enumerate(getattr(k_unit, branch))
        ]
    return []


def batchnorm_pairs(keras_model: keras.Model, torch_model: nn.Module) -> list[tuple[str, object, nn.BatchNorm2d]]:
    """(path, Keras BatchNormalization, torch BatchNorm2d) of every BatchNorm both have, in forward order."""
    pairs = [("stem_bn", keras_model.get_layer("stem_bn"), torch_model.stem_bn)]
    for i in range(UNIT_COUNT):
        k_unit, t_unit = keras_model.get_layer(f"unit_{i}"), getattr(torch_model, f"unit_{i}")
        for branch in ("main_layers", "skip_layers"):
            for j, (k_layer, t_layer) in enumerate(zip(getattr(k_unit, branch), getattr(t_unit, branch), strict=False)):
                if isinstance(k_layer, keras.layers.BatchNormalization) and isinstance(t_layer, nn.BatchNorm2d):
                    pairs.append((f"unit_{i}.{branch}.{j}", k_layer, t_layer))
    return pairs


@contextlib.contextmanager
def restored_torch_state(torch_model: nn.Module) -> Iterator[None]:
    """Put every buffer (BatchNorm's running statistics and counters) and every module's train/eval mode of
    ``torch_model`` back as they were once the block ends: what a training-mode forward without gradients changes.
    Saving them is ~0.03M numbers; a deep copy of the model to run on instead copies its 21M parameters."""
    buffers = [(buffer, buffer.clone()) for buffer in torch_model.buffers()]
    modes = [(module, module.training) for module in torch_model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def restored_batchnorm_statistics(keras_model: keras.Model) -> Iterator[None]:
    """Put every BatchNorm moving statistic of ``keras_model`` back as it was once the block ends
    (a training-mode call updates them all, paired with torch or not)."""
    layers = [layer for layer in keras_model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [
        (keras.ops.convert_to_numpy(bn.moving_mean), keras.ops.convert_to_numpy(bn.moving_variance)) for bn in layers
    ]
    try:
        yield
    finally:
        for bn, (mean, variance) in zip(layers, saved, strict=True):
            bn.moving_mean.assign(mean)
            bn.moving_variance.assign(variance)
