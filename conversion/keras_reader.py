"""Any Keras ResNet-34 read by structure: the one module that walks a Keras model (Keras only).

A model is read into the slots of ``conversion.structure.resnet34_slots`` (stem conv, BN, activation, max-pool;
16 units of main path, skip path and activation; global pooling, optional Flatten, Dense), whatever its layer
names: ``keras_impl.build_resnet34``'s, the book's own code with auto-named layers and its activation FUNCTION
in ``main_layers`` (Sequential or a Functional chain), or a Functional graph whose units are residual branches
joined by ``Add`` (keras-hub's ``ResNetBackbone``, alone or nested in ``ResNetImageClassifier``), where a
``ZeroPadding2D`` before a "valid" conv or max-pool is that layer's padding. Its convention (how it pads and
normalises) comes from its layers. A ConversionError names the first layer that does not fit, what was expected
and what was found.
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
    zero_padding: int | None = None  # a ZeroPadding2D's symmetric padding before this "valid" conv or pool


def _is_unit(layer: object) -> bool:
    """A layer of the book's ResidualUnit design: ours, the book's own class, or any with the same parts."""
    return isinstance(layer, keras.layers.Layer) and all(
        hasattr(layer, attr) for attr in ("main_layers", "skip_layers", "activation")
    )


def _unit_leaves(unit: keras.layers.Layer, where: str) -> list[KerasLeaf]:
    leaves = [KerasLeaf(f"{where}.main_layers[{i}]", layer) for i, layer in enumerate(unit.main_layers)]
    leaves += [KerasLeaf(f"{where}.skip_layers[{i}]", layer) for i, layer in enumerate(unit.skip_layers)]
    return [*leaves, KerasLeaf(f"{where}.activation", unit.activation)]


def _keras_leaves(model: keras.Model) -> list[KerasLeaf]:
    """The model's layers in forward order; a unit contributes its main path, skip path and activation."""
    if not isinstance(model, keras.Sequential):
        return _graph_leaves(model)
    leaves = []
    for layer in model.layers:
        leaves += _layer_leaves(layer)
    return leaves


def _layer_leaves(layer: object) -> list[KerasLeaf]:
    if isinstance(layer, keras.layers.InputLayer):
        return []
    if _is_unit(layer):
        return _unit_leaves(layer, layer.name)
    if isinstance(layer, keras.Model):  # a nested model: keras-hub's backbone inside its classifier
        return _keras_leaves(layer)
    if isinstance(layer, keras.layers.Dropout):  # an identity at inference; only rate 0 is one in training too
        if layer.rate:
            raise ConversionError(
                f"'{layer.name}': Dropout(rate={layer.rate:g}) has no twin in ResNet-34; only rate 0 (an identity) "
                "is read"
            )
        return []
    return [KerasLeaf(layer.name, layer)]


class _Graph:
    """A Functional model's own call graph: which nodes consume each tensor."""

    def __init__(self, model: keras.Model) -> None:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ConversionError(
                f"expected a model of one input and one output; '{model.name}' has {len(model.inputs)} inputs and "
                f"{len(model.outputs)} outputs"
            )
        self.model = model
        self.consumers: dict[int, list] = {}
        for nodes in model._nodes_by_depth.values():
            for node in nodes:
                for tensor in node.arguments.keras_tensors:
                    self.consumers.setdefault(id(tensor), []).append(node)

    def next_nodes(self, tensor: object) -> list:
        return self.consumers.get(id(tensor), [])

    def only_output(self, node: object) -> object:
        if len(node.outputs) != 1:
            raise ConversionError(f"'{node.operation.name}': expected one output, found {len(node.outputs)}")
        return node.outputs[0]


def _is_add(operation: object) -> bool:
    return isinstance(operation, keras.layers.Add) or type(operation).__name__ == "Add"  # layer or `a + b`


def _step(graph: _Graph, node: object, leaves: list[KerasLeaf]) -> object:
    """Read one node of a chain (a ZeroPadding2D with the conv or pool it pads); return the tensor it leaves."""
    operation = node.operation
    if isinstance(operation, keras.layers.ZeroPadding2D):
        (top, bottom), (left, right) = operation.padding
        padded = graph.next_nodes(graph.only_output(node))
        target = padded[0].operation if len(padded) == 1 else None
        if not isinstance(target, keras.layers.Conv2D | keras.layers.MaxPooling2D) or target.padding != "valid":
            raise ConversionError(f"'{operation.name}': expected a ZeroPadding2D before one 'valid' conv or max-pool")
        if len({top, bottom, left, right}) != 1:
            raise ConversionError(
                f"'{operation.name}': zero padding {operation.padding} is not symmetric; it fits no convention "
                "(book: TF 'same'; torchvision: symmetric)"
            )
        leaves.append(KerasLeaf(target.name, target, zero_padding=top))
        return graph.only_output(padded[0])
    leaves += _layer_leaves(operation)
    return graph.only_output(node)


def _branch(graph: _Graph, node: object, leaves: list[KerasLeaf]) -> object:
    """Follow one branch of a residual unit from ``node`` up to the Add that ends it; return that Add's node."""
    while not _is_add(node.operation):
        tensor = _step(graph, node, leaves)
        following = graph.next_nodes(tensor)
        if len(following) != 1:
            raise ConversionError(
                f"'{node.operation.name}': expected a residual branch to run on to one Add; its output feeds "
                f"{len(following)} layers"
            )
        node = following[0]
    return node


def _graph_leaves(model: keras.Model) -> list[KerasLeaf]:
    """A Functional model's layers in forward order, residual branches (Add) read as units."""
    graph = _Graph(model)
    tensor, end, leaves = model.inputs[0], model.outputs[0], []
    while tensor is not end:
        following = graph.next_nodes(tensor)
        if len(following) == 1 and not _is_add(following[0].operation):
            tensor = _step(graph, following[0], leaves)
        elif len(following) == 2:  # a residual unit: main path and skip path (or identity) meet at an Add
            paths = [[], []]
            adds = [_branch(graph, node, path) for node, path in zip(following, paths, strict=True)]
            if adds[0] is not adds[1] or len(adds[0].arguments.keras_tensors) != 2:
                names = sorted(node.operation.name for node in following)
                raise ConversionError(
                    f"layers {names} sit side by side and do not meet at one Add of two inputs (expected a chain "
                    "of layers, or residual units)"
                )
            main, skip = sorted(paths, key=len, reverse=True)
            after = graph.next_nodes(graph.only_output(adds[0]))
            if len(after) != 1:
                raise ConversionError(f"'{adds[0].operation.name}': expected one activation after the Add")
            leaves += main + skip
            tensor = _step(graph, after[0], leaves)
        else:
            names = sorted(node.operation.name for node in following)
            raise ConversionError(
                f"expected a chain of layers, or residual units of two branches; after "
                f"'{getattr(tensor, 'name', '?')}' come {names or 'no layers'} (in '{model.name}')"
            )
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
    head_activation: str | None  # None for a unit, and for a trunk without a head
    activation: str
    convention: str

    @property
    def is_unit(self) -> bool:
        return self.slots[0].name != "stem_conv"

    @property
    def num_classes(self) -> int:
        """The Dense head's width; 0 for a trunk alone (a feature extractor: keras-hub's ResNetBackbone)."""
        return self.layers["classifier"].layer.units if "classifier" in self.layers else 0


def keras_padding(leaf: KerasLeaf) -> str | int:
    """'same' where Keras pads the TF way and that can be asymmetric, else the symmetric padding."""
    layer = leaf.layer
    k, s = layer.kernel_size[0] if hasattr(layer, "kernel_size") else layer.pool_size[0], layer.strides[0]
    if leaf.zero_padding is not None:
        return leaf.zero_padding
    if isinstance(layer, SymmetricPaddingConv2D | SymmetricPaddingMaxPool2D):
        return layer.explicit_padding
    if layer.padding == "valid":
        return 0
    return "same" if needs_explicit_padding(k, s) else k // 2


def _conventions_of(slot: Slot, leaf: KerasLeaf) -> set[str]:
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
            if math.isclose(leaf.layer.epsilon, setting["epsilon"])
            and math.isclose(leaf.layer.momentum, setting["momentum"])
        }
    return set(CONVENTIONS)


def _convention(slots: list[Slot], layers: dict[str, KerasLeaf]) -> str:
    possible = set(CONVENTIONS)
    for slot in slots:
        if slot.name not in layers:
            continue
        leaf = layers[slot.name]
        fits = _conventions_of(slot, leaf)
        if not possible & fits:
            got = (
                f"epsilon {leaf.layer.epsilon:g}, momentum {leaf.layer.momentum:g}"
                if slot.kind == "batch_norm"
                else f"padding {keras_padding(leaf)!r}"
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
        leaves = _keras_leaves(obj)
        trunk = resnet34_slots(head=False)
        slots = trunk if len(leaves) == len(trunk) else resnet34_slots()  # the trunk alone ends after the units
        layers, head = _match_slots(slots, leaves, "model")
        if "classifier" in layers:
            head = head or keras.activations.serialize(layers["classifier"].layer.activation)
    else:
        raise ConversionError(f"expected a Keras ResNet-34 model or ResidualUnit. Received: {type(obj).__name__}")
    names = {activation_name(layers[s.name].layer) for s in slots if s.kind == "activation"}
    if len(names) != 1:
        raise ConversionError(f"expected one activation throughout (the twin has one); found {sorted(names)}")
    pool = layers.get("stem_pool")
    if pool is not None and pool.zero_padding and names != {"relu"}:
        # Zeros pad a max-pool as -inf does only where every input is >= 0: after ReLU.
        raise ConversionError(
            f"'{pool.where}': a zero-padded max-pool after {names.pop()!r} is not the -inf padded max-pool of "
            "either convention (that holds after 'relu' only)"
        )
    return KerasResNet(slots, layers, head, names.pop(), _convention(slots, layers))
