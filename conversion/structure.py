"""ResNet-34 described once, in neither framework's terms: its layers in forward order.

Each framework's reader maps a model onto this list, and each writer builds from it; the converter pairs
the two by position in it, never by the names a builder happened to give. A slot's ``name`` is the torch
twin's module path (``unit_3.main_layers.0``), which doubles as the tensor prefix of its state_dict.
"""

from __future__ import annotations

from dataclasses import dataclass

# (filters, units) per stage: 3/4/6/3 units of 64/128/256/512 filters.
STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
UNIT_COUNT = sum(units for _, units in STAGES)


@dataclass(frozen=True)
class Slot:
    """One layer of ResNet-34: what it must be, wherever it comes from."""

    name: str
    kind: str  # conv | batch_norm | activation | max_pool | global_avg_pool | flatten | dense
    filters: int | None = None  # output channels of a conv, features of a BatchNorm
    kernel_size: int | None = None
    strides: int | None = None
    optional: bool = False  # a Flatten after global pooling is a no-op some models leave out

    def describe(self) -> str:
        """'a 3x3/2 conv with 128 filters', 'a BatchNorm of 64 features', 'an activation', ..."""
        if self.kind == "conv":
            return f"a {self.kernel_size}x{self.kernel_size}/{self.strides} conv with {self.filters} filters"
        if self.kind == "max_pool":
            return f"a {self.kernel_size}x{self.kernel_size}/{self.strides} max-pool"
        if self.kind == "batch_norm":
            return f"a BatchNorm of {self.filters} features"
        return {
            "activation": "an activation",
            "global_avg_pool": "a global average pooling",
            "flatten": "a Flatten",
            "dense": "a Dense head",
        }[self.kind]


def unit_plan() -> list[tuple[int, int, int]]:
    """(in_channels, filters, strides) of each of the 16 residual units."""
    plan, previous = [], 64
    for filters, units in STAGES:
        for _ in range(units):
            plan.append((previous, filters, 1 if filters == previous else 2))
            previous = filters
    return plan


def unit_slots(prefix: str, filters: int, strides: int) -> list[Slot]:
    """The slots of one residual unit: main path, skip path (a projection only when strided), activation."""
    slots = [
        Slot(f"{prefix}main_layers.0", "conv", filters, 3, strides),
        Slot(f"{prefix}main_layers.1", "batch_norm", filters),
        Slot(f"{prefix}main_layers.2", "activation"),
        Slot(f"{prefix}main_layers.3", "conv", filters, 3, 1),
        Slot(f"{prefix}main_layers.4", "batch_norm", filters),
    ]
    if strides > 1:
        slots += [
            Slot(f"{prefix}skip_layers.0", "conv", filters, 1, strides),
            Slot(f"{prefix}skip_layers.1", "batch_norm", filters),
        ]
    return [*slots, Slot(f"{prefix}activation", "activation")]


def resnet34_slots(head: bool = True) -> list[Slot]:
    """Every layer of ResNet-34 in forward order: stem, 16 units, global pooling, (Flatten), Dense.

    ``head=False``: the trunk alone (stem and units), a feature extractor ending in the 512-channel map, as
    keras-hub's ResNetBackbone and transformers' ResNetModel are.
    """
    slots = [
        Slot("stem_conv", "conv", 64, 7, 2),
        Slot("stem_bn", "batch_norm", 64),
        Slot("stem_activation", "activation"),
        Slot("stem_pool", "max_pool", None, 3, 2),
    ]
    for index, (_, filters, strides) in enumerate(unit_plan()):
        slots += unit_slots(f"unit_{index}.", filters, strides)
    if not head:
        return slots
    return [
        *slots,
        Slot("avg_pool", "global_avg_pool"),
        Slot("flatten", "flatten", optional=True),
        Slot("classifier", "dense"),
    ]
