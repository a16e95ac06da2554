"""Weight conversion between the Keras ResNet-34 and its PyTorch twin: the one module that knows both.

Layers are paired by name and kind (``keras_model.layers[i]`` <-> ``torch_model[i]``, and inside a
ResidualUnit ``main_layers[j]`` / ``skip_layers[j]``). Every tensor gets a layout rule:

    Conv2D kernel (kh, kw, in, out)      <-> Conv2d weight (out, in, kh, kw)   transpose(3, 2, 0, 1)
    Dense kernel (in, out)               <-> Linear weight (out, in)           .T
    BatchNormalization gamma, beta,      <-> BatchNorm2d weight, bias,
        moving_mean, moving_variance         running_mean, running_var        as is

The whole plan is checked before anything is written: every source tensor used once, every target
tensor written once, shapes and dtypes equal after the layout change. Values are copied, never cast,
so float64 stays float64 and a round trip is bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import torch
from torch import nn

import keras_impl
import torch_impl
from conversion.errors import ConversionError
from torch_impl.layers import Dense as TorchDense
from torch_impl.layers import GlobalAvgPool2d
from torch_impl.padding import Conv2dSame, MaxPool2dSame

KerasObject = keras.Model | keras_impl.ResidualUnit
TorchObject = torch_impl.ResNet34 | torch_impl.ResidualUnit

# Layout rules, Keras -> torch and back.
_AS_IS = (lambda a: a, lambda a: a)
_CONV = (lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0))
_DENSE = (lambda a: a.T, lambda a: a.T)


@dataclass(frozen=True)
class _TensorPair:
    path: str  # the torch state_dict name, e.g. "unit_3.main_layers.0.weight"
    keras_variable: keras.Variable
    torch_tensor: torch.Tensor
    layout: tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _keras_activation_name(layer: keras.layers.Layer) -> str:
    return keras.activations.serialize(layer.activation)


def _check(condition: bool, path: str, what: str, keras_value: object, torch_value: object) -> None:
    if not condition:
        raise ConversionError(f"{path}: {what} differs: Keras has {keras_value}, torch has {torch_value}")


def _layer_tensors(path: str, layer: keras.layers.Layer, module: nn.Module) -> list[_TensorPair]:
    """The tensor pairs of one Keras layer and its torch twin, after checking they compute the same."""
    prefix = f"{path}." if path else ""
    kinds = f"Keras {type(layer).__name__} cannot pair with torch {type(module).__name__}"
    if isinstance(layer, keras.layers.Conv2D):
        _check(isinstance(module, Conv2dSame), path, "layer kind", type(layer).__name__, type(module).__name__)
        _check(layer.padding == "same", path, "padding", layer.padding, "TF same")
        _check(tuple(layer.strides) == tuple(module.stride), path, "strides", layer.strides, module.stride)
        pairs = [_TensorPair(prefix + "weight", layer.kernel, module.weight, _CONV)]
        _check(layer.use_bias == (module.bias is not None), path, "use_bias", layer.use_bias, module.bias is not None)
        if layer.use_bias:
            pairs.append(_TensorPair(prefix + "bias", layer.bias, module.bias, _AS_IS))
        return pairs
    if isinstance(layer, keras.layers.BatchNormalization):
        _check(isinstance(module, nn.BatchNorm2d), path, "layer kind", type(layer).__name__, type(module).__name__)
        # Same weights with another epsilon or momentum is another function: refuse rather than copy.
        _check(math.isclose(layer.epsilon, module.eps), path, "epsilon", layer.epsilon, module.eps)
        _check(
            math.isclose(layer.momentum, 1 - module.momentum),
            path,
            "momentum (torch = 1 - keras)",
            layer.momentum,
            module.momentum,
        )
        return [
            _TensorPair(prefix + "weight", layer.gamma, module.weight, _AS_IS),
            _TensorPair(prefix + "bias", layer.beta, module.bias, _AS_IS),
            _TensorPair(prefix + "running_mean", layer.moving_mean, module.running_mean, _AS_IS),
            _TensorPair(prefix + "running_var", layer.moving_variance, module.running_var, _AS_IS),
        ]
    if isinstance(layer, keras.layers.Dense):
        _check(isinstance(module, TorchDense), path, "layer kind", type(layer).__name__, type(module).__name__)
        _check(
            _keras_activation_name(layer) == module.activation.keras_name,
            path,
            "activation",
            _keras_activation_name(layer),
            module.activation.keras_name,
        )
        return [
            _TensorPair(prefix + "weight", layer.kernel, module.weight, _DENSE),
            _TensorPair(prefix + "bias", layer.bias, module.bias, _AS_IS),
        ]
    if isinstance(layer, keras.layers.Activation):
        name = getattr(module, "keras_name", type(module).__name__)
        _check(_keras_activation_name(layer) == name, path, "activation", _keras_activation_name(layer), name)
        return []
    if isinstance(layer, keras.layers.MaxPooling2D):
        _check(isinstance(module, MaxPool2dSame), path, "layer kind", type(layer).__name__, type(module).__name__)
        _check(layer.padding == "same", path, "padding", layer.padding, "TF same")
        _check(
            tuple(layer.pool_size) == (module.kernel_size,) * 2 and tuple(layer.strides) == (module.stride,) * 2,
            path,
            "pool size and strides",
            (layer.pool_size, layer.strides),
            (module.kernel_size, module.stride),
        )
        return []
    if isinstance(layer, keras.layers.GlobalAveragePooling2D) and isinstance(module, GlobalAvgPool2d):
        return []
    if isinstance(layer, keras.layers.Flatten) and isinstance(module, nn.Flatten):
        return []
    if isinstance(layer, keras_impl.ResidualUnit) and isinstance(module, torch_impl.ResidualUnit):
        _check(
            layer.activation_name == module.activation_name,
            path,
            "activation",
            layer.activation_name,
            module.activation_name,
        )
        pairs = []
        for branch in ("main_layers", "skip_layers"):
            keras_layers, torch_layers = getattr(layer, branch), getattr(module, branch)
            _check(
                len(keras_layers) == len(torch_layers),
                f"{prefix}{branch}",
                "layer count",
                len(keras_layers),
                len(torch_layers),
            )
            for index, (sub_layer, sub_module) in enumerate(zip(keras_layers, torch_layers, strict=True)):
                pairs += _layer_tensors(f"{prefix}{branch}.{index}", sub_layer, sub_module)
        return pairs
    raise ConversionError(f"{path or 'top'}: {kinds}")


def _plan(keras_obj: KerasObject, torch_obj: TorchObject) -> list[_TensorPair]:
    """Every tensor pair of the two objects, audited (names, shapes, dtypes, each used exactly once)."""
    if isinstance(keras_obj, keras_impl.ResidualUnit) or isinstance(torch_obj, torch_impl.ResidualUnit):
        if isinstance(keras_obj, keras_impl.ResidualUnit) and not keras_obj.built:
            raise ConversionError("the Keras ResidualUnit is not built: call it on an input (or build it) first")
        pairs = _layer_tensors("", keras_obj, torch_obj)
    elif isinstance(keras_obj, keras.Model) and isinstance(torch_obj, torch_impl.ResNet34):
        keras_names = [layer.name for layer in keras_obj.layers]
        torch_names = [name for name, _ in torch_obj.named_children()]
        if keras_names != torch_names:
            diff = next(
                (i for i, (a, b) in enumerate(zip(keras_names, torch_names, strict=False)) if a != b),
                min(len(keras_names), len(torch_names)),
            )
            raise ConversionError(
                f"not the same architecture: layer {diff} is {keras_names[diff : diff + 1] or 'absent'} in Keras "
                f"and {torch_names[diff : diff + 1] or 'absent'} in torch ({len(keras_names)} vs {len(torch_names)} "
                "layers; expected a model from keras_impl.build_resnet34)"
            )
        pairs = [
            p
            for layer, (name, module) in zip(keras_obj.layers, torch_obj.named_children(), strict=True)
            for p in _layer_tensors(name, layer, module)
        ]
    else:
        raise ConversionError(
            "expected a Keras ResNet-34 / ResidualUnit and a torch ResNet34 / ResidualUnit. "
            f"Received: {type(keras_obj).__name__} and {type(torch_obj).__name__}"
        )

    # Audit: every tensor on each side used exactly once, shapes equal after the layout change.
    keras_ids = [id(p.keras_variable) for p in pairs]
    unused = [v.path for v in keras_obj.weights if id(v) not in keras_ids]
    torch_state = {
        k: v for k, v in torch_obj.state_dict(keep_vars=True).items() if not k.endswith("num_batches_tracked")
    }
    planned = [p.path for p in pairs]
    if len(set(keras_ids)) != len(keras_ids) or len(set(planned)) != len(planned):
        raise ConversionError("internal: a tensor would be used twice")
    extra = sorted(set(torch_state) - set(planned))  # in the torch object, with no Keras partner
    missing = sorted(set(planned) - set(torch_state))  # needed by the Keras object, absent in torch
    if unused or missing or extra:
        raise ConversionError(
            f"tensors without a partner: Keras {unused}, torch missing {missing}, torch extra {extra}"
        )
    for p in pairs:
        keras_shape = tuple(p.keras_variable.shape)
        as_torch = p.layout[0](np.empty(keras_shape, dtype=np.uint8)).shape
        _check(
            as_torch == tuple(p.torch_tensor.shape),
            p.path,
            "shape (in torch layout)",
            as_torch,
            tuple(p.torch_tensor.shape),
        )
        keras_dtype = keras.backend.standardize_dtype(p.keras_variable.dtype)
        torch_dtype = str(p.torch_tensor.dtype).removeprefix("torch.")
        _check(keras_dtype == torch_dtype, p.path, "dtype", keras_dtype, torch_dtype)
    return pairs


@dataclass(frozen=True)
class TensorPair:
    """One Keras variable and its torch twin, with the layout change between them."""

    path: str  # the torch state_dict name
    keras_variable: keras.Variable
    torch_tensor: torch.Tensor
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_keras: Callable[[np.ndarray], np.ndarray]


def paired_tensors(keras_obj: KerasObject, torch_obj: TorchObject) -> list[TensorPair]:
    """Every (Keras variable, torch tensor) pair of two twins, audited; the torch tensors are the live ones."""
    return [TensorPair(p.path, p.keras_variable, p.torch_tensor, *p.layout) for p in _plan(keras_obj, torch_obj)]


def check_same_architecture(keras_obj: KerasObject, torch_obj: TorchObject) -> None:
    """Raise ConversionError unless the two have the same layers and tensor shapes (nothing is copied)."""
    _plan(keras_obj, torch_obj)


def copy_keras_to_torch(keras_obj: KerasObject, torch_obj: TorchObject) -> None:
    """Copy every weight of a Keras model/unit into its existing torch twin (checked first)."""
    pairs = _plan(keras_obj, torch_obj)
    with torch.no_grad():
        for p in pairs:
            value = p.layout[0](keras.ops.convert_to_numpy(p.keras_variable))
            p.torch_tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def copy_torch_to_keras(torch_obj: TorchObject, keras_obj: KerasObject) -> None:
    """Copy every weight of a torch model/unit into its existing Keras twin (checked first)."""
    pairs = _plan(keras_obj, torch_obj)
    for p in pairs:
        p.keras_variable.assign(p.layout[1](p.torch_tensor.detach().cpu().numpy()))


def _torch_dtype(keras_obj: KerasObject) -> torch.dtype:
    dtypes = {keras.backend.standardize_dtype(v.dtype) for v in keras_obj.weights}
    if len(dtypes) != 1:
        raise ConversionError(f"expected weights of one dtype. Received: {sorted(dtypes)}")
    return getattr(torch, dtypes.pop())


def keras_to_torch(obj: KerasObject) -> TorchObject:
    """The torch twin of a Keras ResNet-34 or ResidualUnit, weights copied, in eval mode."""
    if isinstance(obj, keras_impl.ResidualUnit):
        if not obj.built:
            raise ConversionError("the Keras ResidualUnit is not built: call it on an input (or build it) first")
        in_channels = obj.main_layers[0].kernel.shape[2]
        twin = torch_impl.ResidualUnit(in_channels, obj.filters, obj.strides, obj.activation_name)
    elif isinstance(obj, keras.Model):
        names = {layer.name: layer for layer in obj.layers}
        if not {"stem_conv", "stem_activation", "classifier"} <= set(names):
            raise ConversionError(
                "expected a ResNet-34 from keras_impl.build_resnet34. "
                f"Received: a model with layers {list(names)[:5]}..."
            )
        twin = torch_impl.ResNet34(
            num_classes=names["classifier"].units,
            in_channels=names["stem_conv"].kernel.shape[2],
            classifier_activation=_keras_activation_name(names["classifier"]),
            activation=_keras_activation_name(names["stem_activation"]),
        )
    else:
        raise ConversionError(f"expected a Keras ResNet-34 model or ResidualUnit. Received: {type(obj).__name__}")
    twin = twin.to(_torch_dtype(obj))  # before copying, so float64 never passes through float32
    copy_keras_to_torch(obj, twin)
    return twin.eval()


def torch_to_keras(obj: TorchObject, input_shape: tuple = (224, 224, 3)) -> KerasObject:
    """The Keras twin of a torch ResNet34 or ResidualUnit, weights copied.

    ``input_shape`` is (height, width, channels) for a model; a unit is built for any height and width.
    """
    if not isinstance(obj, torch_impl.ResidualUnit | torch_impl.ResNet34):
        raise ConversionError(f"expected a torch ResNet34 or ResidualUnit. Received: {type(obj).__name__}")
    dtypes = {t.dtype for t in obj.state_dict().values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ConversionError(f"expected weights of one dtype. Received: {sorted(map(str, dtypes))}")
    dtype = str(dtypes.pop()).removeprefix("torch.")
    if isinstance(obj, torch_impl.ResidualUnit):
        twin = keras_impl.ResidualUnit(obj.filters, obj.strides, obj.activation_name, dtype=dtype)
        twin.build((None, None, None, obj.in_channels))
    elif isinstance(obj, torch_impl.ResNet34):
        if input_shape[-1] != obj.in_channels:
            raise ConversionError(
                f"input_shape has {input_shape[-1]} channels but the torch model takes {obj.in_channels}. "
                f"Received: input_shape={input_shape}"
            )
        twin = keras_impl.build_resnet34(
            obj.num_classes, input_shape, obj.classifier_activation, dtype, activation=obj.activation_name
        )
    copy_torch_to_keras(obj, twin)
    return twin
