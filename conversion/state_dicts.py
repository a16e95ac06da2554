"""torch state dicts of ResNet-34: the twin's key names, or torchvision's / timm's (torch only).

torchvision's and timm's resnet34 share key names (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0``, ``fc``) and compute the torchvision convention (symmetric padding, BatchNorm epsilon
1e-5); the twin's own names (``stem_conv``, ``unit_0.main_layers.0``, ...) mean the book convention. Every state
dict is checked in full before it is loaded: names, shapes, one dtype, finite values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

import torch_impl
from conversion.arrays import single_dtype
from conversion.errors import ConversionError, WeightFileError
from torch_impl.padding import CONVENTIONS
from torch_impl.resnet34 import twin_key_names


def target_convention(source: str, convention: str | None) -> str:
    """The convention a conversion computes in: ``convention`` when given (checked), else the source's."""
    if convention is None:
        return source
    if convention not in CONVENTIONS:
        raise ConversionError(f"unknown convention; expected one of {CONVENTIONS}. Received: convention={convention!r}")
    return convention


def state_dict_convention(state: Mapping[str, torch.Tensor]) -> str | None:
    """'book' for the twin's key names, 'torchvision' for torchvision's / timm's, None for neither."""
    if "stem_conv.weight" in state:
        return "book"
    if "conv1.weight" in state and "fc.weight" in state:
        return "torchvision"
    return None


def twin_from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    classifier_activation: str | None = "softmax",
    activation: str = "relu",
    source: str = "state_dict",
) -> torch_impl.ResNet34:
    """A torch_impl.ResNet34 holding ``state`` (the twin's key names, or torchvision's / timm's), checked first.

    torchvision's names give the torchvision convention (its padding, epsilon and momentum), so the twin
    computes exactly what torchvision's resnet34 computes with these weights.
    """
    convention = state_dict_convention(state)
    if convention is None:
        sample = ", ".join(list(state)[:3])
        raise WeightFileError(
            f"{source}: not a ResNet-34 state_dict: expected the twin's keys (stem_conv.weight, ...) or "
            f"torchvision's / timm's (conv1.weight, ..., fc.weight); found {len(state)} tensors: {sample}, ..."
        )
    head, stem = ("classifier", "stem_conv") if convention == "book" else ("fc", "conv1")
    for key in (f"{stem}.weight", f"{head}.weight"):
        if key not in state:
            raise WeightFileError(f"{source}: not a ResNet-34 state_dict: no '{key}'")
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    try:
        dtype = single_dtype({str(t.dtype).removeprefix("torch.") for t in floating.values()})
    except ConversionError as error:
        raise WeightFileError(f"{source}: {error}") from None
    model = torch_impl.ResNet34(
        num_classes=state[f"{head}.weight"].shape[0],
        in_channels=state[f"{stem}.weight"].shape[1],
        classifier_activation=classifier_activation,
        activation=activation,
        convention=convention,
    ).to(getattr(torch, dtype))
    if convention == "torchvision":
        names = twin_key_names(model)
        state = {names.get(k, k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if convention == "torchvision":  # name them as the file does
        missing = [torch_impl.torchvision_key(k) for k in missing]
    if missing or unexpected:
        raise WeightFileError(
            f"{source}: not a ResNet-34 state_dict: {len(missing)} tensors missing "
            f"({', '.join(missing[:2])}...), {len(unexpected)} unexpected ({', '.join(unexpected[:2])}...)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightFileError(
                f"{source}: {key} has shape {tuple(tensor.shape)}; ResNet-34 expects {tuple(expected[key].shape)}"
            )
    for key, tensor in floating.items():
        if not torch.isfinite(tensor).all():
            raise WeightFileError(f"{source}: tensor {key} holds NaN or Inf; expected finite weights")
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent; all else checked above
    return model.eval()


def twin_from_torchvision(model: nn.Module, classifier_activation: str | None = None) -> torch_impl.ResNet34:
    """The twin of a torchvision or timm resnet34 module: its state_dict in the torchvision convention.

    The module's own padding and BatchNorm epsilon are checked against torchvision's (a ResNet with other
    settings would silently become another function).
    """
    if not isinstance(model, nn.Module) or state_dict_convention(model.state_dict()) != "torchvision":
        raise ConversionError(
            "expected a torch_impl ResNet34 / ResidualUnit or a torchvision / timm resnet34. "
            f"Received: {type(model).__name__}"
        )
    checks = [
        ("conv1.padding", tuple(model.conv1.padding), (3, 3)),
        ("maxpool.padding", _pair(model.maxpool.padding), (1, 1)),
    ]
    checks += [(f"{name}.eps", m.eps, 1e-5) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for what, got, expected in checks:
        if got != expected:
            raise ConversionError(f"{what} is {got}; torchvision's resnet34 has {expected}")
    return twin_from_state_dict(
        model.state_dict(), classifier_activation=classifier_activation, source=type(model).__name__
    )


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def torchvision_state_dict(model: torch_impl.ResNet34) -> dict[str, torch.Tensor]:
    """The twin's state_dict under torchvision's key names, loadable by ``torchvision.models.resnet34`` strictly."""
    return {torch_impl.torchvision_key(k): v for k, v in model.state_dict().items()}


def with_convention(twin: torch_impl.ResNet34, convention: str | None) -> torch_impl.ResNet34:
    """``twin`` itself, or a copy computing in ``convention`` with the same weights (the twin's names do not
    depend on the convention, so its state_dict carries over unchanged)."""
    target = target_convention(twin.convention, convention)
    if target == twin.convention:
        return twin
    dtype = next(t.dtype for t in twin.state_dict().values() if t.is_floating_point())
    other = torch_impl.ResNet34(
        twin.num_classes, twin.in_channels, twin.classifier_activation, twin.activation_name, target
    ).to(dtype)
    other.load_state_dict(twin.state_dict())
    return other.eval()


def function_change(
    before: torch_impl.ResNet34, after: torch_impl.ResNet34, size: tuple[int, int], batch: int = 8, seed: int = 0
) -> dict:
    """How much ``after`` computes otherwise than ``before`` on seeded images: max rel err of the logits
    (max |after - before| / max |before|) and the share of images whose top-1 class is unchanged."""
    dtype = next(t.dtype for t in before.state_dict().values() if t.is_floating_point())
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, before.in_channels, *size, generator=generator, dtype=torch.float64).to(dtype)

    def logits(model: torch_impl.ResNet34) -> torch.Tensor:
        with torch.no_grad():
            return model.eval().forward_head(model.forward_features(images))

    a, b = logits(before), logits(after)
    return {
        "convention": [before.convention, after.convention],
        "images": f"{batch} seeded standard-normal images of {size[0]}x{size[1]}",
        "logits_max_rel_err": float((b - a).abs().max() / a.abs().max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
    }
