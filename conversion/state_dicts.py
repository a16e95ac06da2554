"""torch state dicts of ResNet-34 in the layouts people save them in (torch only).

- the twin's own names (``stem_conv``, ``unit_0.main_layers.0``, ...): the book convention;
- torchvision's and timm's (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer2.0.downsample.0``, ``fc``): the
  torchvision convention (symmetric padding, BatchNorm epsilon 1e-5);
- Hugging Face transformers' ``ResNetForImageClassification`` (``resnet.embedder.embedder.convolution``,
  ``resnet.encoder.stages.{s}.layers.{b}.layer.{i}``, ``...shortcut``, ``classifier.1``), which computes the
  torchvision convention too (its convs pad ``k // 2``, its BatchNorms keep torch's epsilon): renamed to
  torchvision's names, its forward is torchvision's exactly.

Any of them may sit under one prefix (``module.`` from DataParallel/DDP, a Lightning module's attribute such as
``model.``): the prefix under which a complete ResNet-34 is found is stripped, and said so. Every state dict is
checked in full before it is loaded: names, shapes, one dtype, finite values; a refusal names the first key or
shape that is not ResNet-34's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

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
    if "conv1.weight" in state and ("fc.weight" in state or _TRUNK_END in state):
        return "torchvision"
    return None


# The last tensor of torchvision's trunk: with it and without ``fc``, a state dict is the trunk alone (timm's
# ``num_classes=0``, a backbone, transformers' ResNetModel).
_TRUNK_END = "layer4.2.bn2.weight"


# --- Hugging Face transformers' names <-> torchvision's ------------------------------------------------------

_HF_STAGE = re.compile(
    r"(?:resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.[01]|shortcut)\.(convolution|normalization)\.(.+)"
)
_HF_STEM = re.compile(r"(?:resnet\.)?embedder\.embedder\.(convolution|normalization)\.(.+)")
_HF_PART = {
    ("layer.0", "convolution"): "conv1",
    ("layer.0", "normalization"): "bn1",
    ("layer.1", "convolution"): "conv2",
    ("layer.1", "normalization"): "bn2",
    ("shortcut", "convolution"): "downsample.0",
    ("shortcut", "normalization"): "downsample.1",
}
_TV_PART = {value: key for key, value in _HF_PART.items()}


def huggingface_to_torchvision_key(key: str) -> str | None:
    """torchvision's name of a transformers ResNet key (``resnet.`` prefix optional), or None for another key."""
    if key in ("classifier.1.weight", "classifier.1.bias"):
        return f"fc.{key.rsplit('.', 1)[1]}"
    match = _HF_STEM.fullmatch(key)
    if match:
        return f"{'conv1' if match.group(1) == 'convolution' else 'bn1'}.{match.group(2)}"
    match = _HF_STAGE.fullmatch(key)
    if match:
        stage, block, part, kind, tensor = match.groups()
        return f"layer{int(stage) + 1}.{block}.{_HF_PART[(part, kind)]}.{tensor}"
    return None


def torchvision_to_huggingface_key(key: str) -> str:
    """transformers' ``ResNetForImageClassification`` name of a torchvision resnet34 key."""
    if key.startswith("fc."):
        return f"classifier.1.{key[3:]}"
    if key.startswith(("conv1.", "bn1.")):
        kind = "convolution" if key.startswith("conv1.") else "normalization"
        return f"resnet.embedder.embedder.{kind}.{key.split('.', 1)[1]}"
    match = re.fullmatch(r"layer(\d)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.[01])\.(.+)", key)
    if not match:
        raise KeyError(key)
    layer, block, part, tensor = match.groups()
    hf_part, kind = _TV_PART[part]
    return f"resnet.encoder.stages.{int(layer) - 1}.layers.{block}.{hf_part}.{kind}.{tensor}"


# --- reading any layout, under any prefix ----------------------------------------------------------------

_ANCHORS = {  # a key each layout must have, and its layout
    "stem_conv.weight": "twin",
    "conv1.weight": "torchvision",
    "resnet.embedder.embedder.convolution.weight": "huggingface",
    "embedder.embedder.convolution.weight": "huggingface",
}
_LAYOUT_NAMES = {
    "twin": "the twin's names",
    "torchvision": "torchvision's / timm's names",
    "huggingface": "Hugging Face transformers' ResNetForImageClassification names",
}


@dataclass(frozen=True)
class ResNetStateDict:
    """A state dict read as ResNet-34: its tensors under the twin's or torchvision's names, and what was done."""

    state: dict[str, torch.Tensor]
    layout: str  # "twin", "torchvision" or "huggingface" (renamed to torchvision's names)
    prefix: str  # stripped from every key ("" for none)
    set_aside: tuple[str, ...]  # keys outside the prefix, not part of the model

    @property
    def convention(self) -> str:
        return "book" if self.layout == "twin" else "torchvision"

    def note(self) -> str | None:
        """One line on what was read, where it is not a plain state dict of our or torchvision's names."""
        parts = []
        if self.layout == "huggingface":
            parts.append(f"read {_LAYOUT_NAMES['huggingface']} as torchvision's")
        if not any(key in self.state for key in ("fc.weight", "classifier.weight")):
            parts.append("no classifier: read as ResNet-34's trunk alone (its output is the 512-channel feature map)")
        if self.prefix:
            parts.append(f"stripped the prefix '{self.prefix}' from every key")
        if self.set_aside:
            shown = ", ".join(self.set_aside[:3]) + (", ..." if len(self.set_aside) > 3 else "")
            parts.append(f"set aside {len(self.set_aside)} keys outside it ({shown})")
        return "; ".join(parts) or None


def _prefixes(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Every prefix under which a layout's anchor key appears, shortest first."""
    found = set()
    for key in state:
        for anchor in _ANCHORS:
            if key.endswith(anchor) and (len(key) == len(anchor) or key[-len(anchor) - 1] == "."):
                found.add(key[: len(key) - len(anchor)])
    return sorted(found, key=lambda prefix: (len(prefix), prefix))


def read_state_dict(state: Mapping[str, torch.Tensor], source: str = "state_dict") -> ResNetStateDict:
    """Find ResNet-34 in a state dict: its layout (the twin's, torchvision's/timm's or transformers' names) and the
    prefix it sits under; transformers' names become torchvision's. A WeightFileError says what does not fit."""
    for prefix in _prefixes(state):
        inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        layout = next((layout for anchor, layout in _ANCHORS.items() if anchor in inside), None)
        if layout == "huggingface":
            renamed = {huggingface_to_torchvision_key(k): v for k, v in inside.items()}
            if None in renamed:
                other = next(k for k in inside if huggingface_to_torchvision_key(k) is None)
                raise WeightFileError(f"{source}: not a ResNet-34 of transformers' layout: unexpected key '{other}'")
            inside = renamed  # without classifier.1: a ResNetModel, the trunk alone
        elif layout == "torchvision" and "fc.weight" not in inside and _TRUNK_END not in inside:
            continue  # conv1.weight alone is not enough to call it torchvision's resnet
        if layout is not None:
            outside = tuple(k for k in state if not k.startswith(prefix))
            return ResNetStateDict(dict(inside), layout, prefix, outside)
    raise WeightFileError(f"{source}: not a ResNet-34 state_dict: {_misfit(state)}")


def _misfit(state: Mapping[str, torch.Tensor]) -> str:
    """What does not fit in a state dict that no layout reads: the first key that is not ResNet-34's."""
    if any(key.endswith(("fc.weight", "layer1.0.conv1.weight")) for key in state):  # torchvision-like: compare
        prefix = (
            next(k[: -len("fc.weight")] for k in state if k.endswith("fc.weight"))
            if any(k.endswith("fc.weight") for k in state)
            else ""
        )
        inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        expected = [torch_impl.torchvision_key(k) for k in torch_impl.ResNet34(convention="torchvision").state_dict()]
        missing = next((k for k in expected if k not in inside), None)
        unexpected = next((k for k in inside if k not in expected), None)
        text = []
        if unexpected is not None:
            text.append(
                f"the first key that is not ResNet-34's is '{prefix}{unexpected}' {list(inside[unexpected].shape)}"
            )
        if missing is not None:
            text.append(f"ResNet-34's '{prefix}{missing}' is absent")
        if {"conv1.0.weight", "conv1.3.weight", "conv1.6.weight"} <= set(inside):
            text.append("a 3-conv deep stem (conv1.0, conv1.3, conv1.6, as in resnet-d), another network")
        return "; ".join(text) or "expected torchvision's resnet34 keys"
    sample = ", ".join(list(state)[:3])
    return (
        "expected the twin's keys (stem_conv.weight, ...), torchvision's / timm's (conv1.weight, ..., fc.weight) or "
        f"transformers' (resnet.embedder...); found {len(state)} tensors: {sample}, ..."
    )


Module = TypeVar("Module", bound=nn.Module)


def empty_twin(build: Callable[[], Module], dtype: str) -> Module:
    """``build()`` on the meta device, then given uninitialised CPU memory of ``dtype``, ``num_batches_tracked`` at 0.

    For a twin whose every weight is copied in next: torch's own initialisation of ResNet-34's 21M weights (and the
    Keras-like one after it) costs ~0.15 s for nothing, and float64 never passes through float32."""
    with torch.device("meta"):
        model = build()
    model = model.to(getattr(torch, dtype)).to_empty(device="cpu")
    for module in model.modules():  # the one buffer neither Keras nor every file has
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None:
            module.num_batches_tracked.zero_()
    return model


def twin_from_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    classifier_activation: str | None = "softmax",
    activation: str = "relu",
    source: str = "state_dict",
) -> torch_impl.ResNet34:
    """A torch_impl.ResNet34 holding ``state`` (any layout ``read_state_dict`` reads, under any prefix), checked first.

    torchvision's (and transformers') names give the torchvision convention (its padding, epsilon and momentum), so
    the twin computes exactly what torchvision's resnet34 computes with these weights.
    """
    read = state if isinstance(state, ResNetStateDict) else read_state_dict(state, source)
    state, convention = read.state, read.convention
    head, stem = ("classifier", "stem_conv") if convention == "book" else ("fc", "conv1")
    if f"{stem}.weight" not in state:
        raise WeightFileError(f"{source}: not a ResNet-34 state_dict: no '{read.prefix}{stem}.weight'")
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    try:
        dtype = single_dtype({str(t.dtype).removeprefix("torch.") for t in floating.values()})
    except ConversionError as error:
        raise WeightFileError(f"{source}: {error}") from None
    model = empty_twin(
        lambda: torch_impl.ResNet34(
            num_classes=state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else 0,  # 0: the trunk alone
            in_channels=state[f"{stem}.weight"].shape[1],
            classifier_activation=classifier_activation,
            activation=activation,
            convention=convention,
        ),
        dtype,
    )
    if convention == "torchvision":
        names = twin_key_names(model)
        state = {names.get(k, k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if convention == "torchvision":  # name them as the file does
        missing = [torch_impl.torchvision_key(k) for k in missing]
    if missing or unexpected:
        weight, bias = f"{head}.weight" in state, f"{head}.bias" in state
        if weight != bias:  # half a head: say so, not "classifier.bias is unexpected"
            present, absent = (f"{head}.weight", f"{head}.bias") if weight else (f"{head}.bias", f"{head}.weight")
            raise WeightFileError(
                f"{source}: not a ResNet-34 state_dict: '{read.prefix}{present}' without '{read.prefix}{absent}' "
                "(a head has both; a trunk alone has neither)"
            )
        if unexpected:
            shape = list(state[unexpected[0]].shape)
            first = f"the first key that is not ResNet-34's is '{read.prefix}{unexpected[0]}' {shape}"
        else:
            first = f"ResNet-34's '{read.prefix}{missing[0]}' is absent"
        raise WeightFileError(
            f"{source}: not a ResNet-34 state_dict: {first} ({len(missing)} tensors missing, {len(unexpected)} "
            "unexpected)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            name = torch_impl.torchvision_key(key) if convention == "torchvision" else key
            raise WeightFileError(
                f"{source}: {read.prefix}{name} has shape {tuple(tensor.shape)}; ResNet-34 expects "
                f"{tuple(expected[key].shape)}"
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
            features = model.eval().forward_features(images)
            return model.forward_head(features) if model.num_classes else features.flatten(1)

    a, b = logits(before), logits(after)
    return {
        "convention": [before.convention, after.convention],
        "images": f"{batch} seeded standard-normal images of {size[0]}x{size[1]}",
        "logits_max_rel_err": float((b - a).abs().max() / a.abs().max()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
    }
