"""Any Keras ResNet-34 read by structure: the one module that walks a Keras model (Keras only).

A model is read into the slots of ``conversion.structure.resnet34_slots`` (stem conv, BN, activation, max-pool;
16 units of main path, skip path and activation; global pooling, optional Flatten, Dense), whatever its layer
names: ``keras_impl.build_resnet34``'s, or the book's own code with auto-named layers and its activation FUNCTION
in ``main_layers``, Sequential or a Functional chain. Its convention (how it pads and normalises) comes from its
layers. A ConversionError names the first layer that does not fit, what was expected and what was found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from conversion.errors import ConversionError
from conversion.structure import Slot, resnet34_slots, unit_slots
from keras_impl.layers import BATCH_NORM as KERAS_BATCH_NORM
from keras_impl.padding import (
    CONVENTIONS,
    SymmetricPaddingConv2D,
    SymmetricPaddingMaxPool2D,
    needs_explicit_padding,
)


@dataclass(frozen=True)
class KerasLeaf:
    where: str  # for messages: "residual_unit_7.main_layers[2]"
    layer: object  # a keras Layer, or an activation function (the book's main_layers[2])


def _is_unit(layer: object) -> bool:
    """A layer of the book's ResidualUnit design: ours, the book's own class, or any with the same parts."""
    return isinstance(layer, keras.layers.Layer) and all(
        hasattr(layer, attr) for attr in ("main_layers", "skip_layers", "activation")
    )


def _unit_leaves(unit: keras.layers.Layer, where: str) -> list[KerasLeaf]:
    leaves = [KerasLeaf(f"{where}.main_layers[{i}]", layer) for i, layer in enumerate(unit.main_layers)]
    leaves += [KerasLeaf(f"{where}.skip_layers[{i}]", layer) for i, layer in enumerate(unit.skip_layers)]
    return [*leaves, KerasLeaf(f"{where}.activation", unit.activation)]


def _check_chain(model: keras.Model) -> None:
    """A Functional model must be a plain chain: one operation at each depth of its own graph."""
    for depth, nodes in sorted(getattr(model, "_nodes_by_depth", {}).items()):
        if len(nodes) != 1:
            names = sorted(node.operation.name for node in nodes)
            raise ConversionError(
                f"expected a chain of layers (Sequential, or Functional with each layer called once on the previous "
                f"one's output); layers {names} sit side by side (graph depth {depth})"
            )


def _keras_leaves(model: keras.Model) -> list[KerasLeaf]:
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):
        _check_chain(model)
    leaves = []
    for layer in layers:
        leaves += _unit_leaves(layer, layer.name) if _is_unit(layer) else [KerasLeaf(layer.name, layer)]
    return leaves


def activation_name(leaf: object) -> str | None:
    """The Keras name of an activation layer or function ('relu', 'linear', ...), or None if it is not one."""
    if isinstance(leaf, keras.layers.Activation):
        return keras.activations.serialize(leaf.activation)
    if isinstance(leaf, keras.layers.ReLU):
        plain = leaf.max_value is None and not leaf.negative_slope and not leaf.threshold
        return "relu" if plain else None
    if isinstance(leaf, keras.layers.Softmax):
        return "softmax" if leaf.axis in (-1, [-1]) else None
    if callable(leaf) and not isinstance(leaf, keras.layers.Layer):
        try:
            return keras.activations.serialize(leaf)
        except (ValueError, TypeError):
            return None
    return None


def describe_keras(leaf: object) -> str:
    if isinstance(leaf, keras.layers.Conv2D):
        (k, _), (s, _) = leaf.kernel_size, leaf.strides
        return f"{type(leaf).__name__} {k}x{leaf.kernel_size[1]}/{s} with {leaf.filters} filters"
    if isinstance(leaf, keras.layers.MaxPooling2D):
        return f"{type(leaf).__name__} {leaf.pool_size[0]}x{leaf.pool_size[1]}/{leaf.strides[0]}"
    if isinstance(leaf, keras.layers.BatchNormalization):
        return f"BatchNormalization of {leaf.gamma.shape[0] if leaf.built else '?'} features"
    name = activation_name(leaf)
    return f"activation '{name}'" if name else type(leaf).__name__


def _fits(slot: Slot, leaf: object) -> bool:
    """Whether a Keras layer is the kind of layer ``slot`` needs, with its filters, kernel and strides."""
    square = lambda pair: pair[0] == pair[1]  # noqa: E731
    if slot.kind == "conv":
        return (
            isinstance(leaf, keras.layers.Conv2D)
            and type(leaf) in (keras.layers.Conv2D, SymmetricPaddingConv2D)
            and square(leaf.kernel_size)
            and square(leaf.strides)
            and tuple(leaf.dilation_rate) == (1, 1)
            and leaf.groups == 1
            and (leaf.filters, leaf.kernel_size[0], leaf.strides[0]) == (slot.filters, slot.kernel_size, slot.strides)
        )
    if slot.kind == "max_pool":
        return (
            isinstance(leaf, keras.layers.MaxPooling2D)
            and square(leaf.pool_size)
            and (leaf.pool_size[0], leaf.strides[0]) == (slot.kernel_size, slot.strides)
        )
    if slot.kind == "batch_norm":
        return (
            isinstance(leaf, keras.layers.BatchNormalization)
            and leaf.axis in (-1, 3, [-1], [3])
            and leaf.center
            and leaf.scale
            and not getattr(leaf, "renorm", False)
            and (not leaf.built or leaf.gamma.shape[0] == slot.filters)
        )
    if slot.kind == "activation":
        return activation_name(leaf) is not None
    if slot.kind == "global_avg_pool":
        return isinstance(leaf, keras.layers.GlobalAveragePooling2D) and not leaf.keepdims
    if slot.kind == "flatten":
        return isinstance(leaf, keras.layers.Flatten)
    if slot.kind == "dense":
        return isinstance(leaf, keras.layers.Dense)
    raise AssertionError(slot.kind)


def _match_slots(slots: list[Slot], leaves: list[KerasLeaf], what: str) -> tuple[dict[str, KerasLeaf], str | None]:
    """{slot name: leaf} in forward order, and the head activation given as a trailing layer (if any)."""
    matched: dict[str, KerasLeaf] = {}
    position = 0
    for slot in slots:
        leaf = leaves[position] if position < len(leaves) else None
        if leaf is not None and _fits(slot, leaf.layer):
            matched[slot.name] = leaf
            position += 1
        elif not slot.optional:
            found = f"'{leaf.where}' ({describe_keras(leaf.layer)})" if leaf else "the end of the model"
            raise ConversionError(
                f"not a ResNet-34 of the book's design: expected {slot.describe()} (ResNet-34 layer {slot.name}), "
                f"found {found}"
            )
    rest = leaves[position:]
    head_activation = None
    if len(rest) == 1 and activation_name(rest[0].layer) and "classifier" in matched:
        head_activation = activation_name(rest[0].layer)  # Dense(...) followed by Activation("softmax")
        if keras.activations.serialize(matched["classifier"].layer.activation) != "linear":
            raise ConversionError(f"'{rest[0].where}': a second head activation after an activated Dense")
    elif rest:
        raise ConversionError(
            f"not a ResNet-34 of the book's design: '{rest[0].where}' ({describe_keras(rest[0].layer)}) "
            f"follows the last layer of the {what}"
        )
    return matched, head_activation


@dataclass(frozen=True)
class KerasResNet:
    """A Keras ResNet-34 or ResidualUnit read by structure: its layers by slot, and what defines its function."""

    slots: list[Slot]
    layers: dict[str, KerasLeaf]
    head_activation: str | None  # None for a unit
    activation: str
    convention: str


def keras_padding(layer: keras.layers.Layer) -> str | int:
    """'same' where Keras pads the TF way and that can be asymmetric, else the symmetric padding."""
    k, s = layer.kernel_size[0] if hasattr(layer, "kernel_size") else layer.pool_size[0], layer.strides[0]
    if isinstance(layer, SymmetricPaddingConv2D | SymmetricPaddingMaxPool2D):
        return layer.explicit_padding
    if layer.padding == "valid":
        return 0
    return "same" if needs_explicit_padding(k, s) else k // 2


def _conventions_of(slot: Slot, leaf: object) -> set[str]:
    """The conventions a conv, max-pool or BatchNorm layer is consistent with (all, for other layers)."""
    if slot.kind in ("conv", "max_pool"):
        padding, k = keras_padding(leaf), slot.kernel_size
        if padding == "same":
            return {"book"}
        if padding != k // 2:
            return set()
        return {"torchvision"} if needs_explicit_padding(k, slot.strides) else set(CONVENTIONS)
    if slot.kind == "batch_norm":
        return {
            name
            for name, setting in KERAS_BATCH_NORM.items()
            if math.isclose(leaf.epsilon, setting["epsilon"]) and math.isclose(leaf.momentum, setting["momentum"])
        }
    return set(CONVENTIONS)


def _convention(slots: list[Slot], layers: dict[str, KerasLeaf]) -> str:
    possible = set(CONVENTIONS)
    for slot in slots:
        if slot.name not in layers:
            continue
        leaf = layers[slot.name]
        fits = _conventions_of(slot, leaf.layer)
        if not possible & fits:
            got = (
                f"epsilon {leaf.layer.epsilon:g}, momentum {leaf.layer.momentum:g}"
                if slot.kind == "batch_norm"
                else f"padding {keras_padding(leaf.layer)!r}"
            )
            expected = "; ".join(
                f"{name}: epsilon {s['epsilon']:g}, momentum {s['momentum']:g}" for name, s in KERAS_BATCH_NORM.items()
            )
            if slot.kind != "batch_norm":
                expected = f"book: TF 'same'; torchvision: symmetric {slot.kernel_size // 2}"
            earlier = f" (earlier layers fit only {sorted(possible)})" if fits else ""
            raise ConversionError(f"'{leaf.where}': {got} fits no convention{earlier}; expected {expected}")
        possible &= fits
    return "book" if "book" in possible else possible.pop()


def read_keras(obj: keras.Model | keras.layers.Layer) -> KerasResNet:
    """Read a Keras ResNet-34 model or ResidualUnit by structure; a ConversionError names the first misfit."""
    if _is_unit(obj):
        if not obj.built:
            raise ConversionError("the Keras ResidualUnit is not built: call it on an input (or build it) first")
        conv = obj.main_layers[0] if obj.main_layers else None
        if not isinstance(conv, keras.layers.Conv2D):
            raise ConversionError(f"'{obj.name}.main_layers[0]': expected a conv, found {describe_keras(conv)}")
        slots = unit_slots("", conv.filters, conv.strides[0])
        layers, _ = _match_slots(slots, _unit_leaves(obj, obj.name), "unit")
        head = None
    elif isinstance(obj, keras.Model):
        slots = resnet34_slots()
        layers, head = _match_slots(slots, _keras_leaves(obj), "model")
        head = head or keras.activations.serialize(layers["classifier"].layer.activation)
    else:
        raise ConversionError(f"expected a Keras ResNet-34 model or ResidualUnit. Received: {type(obj).__name__}")
    names = {activation_name(layers[s.name].layer) for s in slots if s.kind == "activation"}
    if len(names) != 1:
        raise ConversionError(f"expected one activation throughout (the twin has one); found {sorted(names)}")
    return KerasResNet(slots, layers, head, names.pop(), _convention(slots, layers))
