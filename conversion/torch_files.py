"""torch weight files: .pt / .pth / .ckpt / .bin / .safetensors state dicts and Hugging Face transformers folders.

Loading never runs code from a file: ``torch.load(weights_only=True)``; a whole pickled model is refused with the
line that gets its state dict in the user's own trusted environment. Every state dict is read by
``conversion.state_dicts`` (any layout, under any prefix) and checked in full before it is loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

import torch_impl
from conversion.errors import ConversionError, WeightFileError
from conversion.file_io import (
    HEAD_AUTO,
    HF_WEIGHTS,
    TORCH_SUFFIXES,
    atomic_output,
    check_source,
    first_line,
)
from conversion.state_dicts import (
    read_state_dict,
    torchvision_state_dict,
    torchvision_to_huggingface_key,
    twin_from_state_dict,
)

# The transformers ResNetConfig of a ResNet-34 of basic blocks (microsoft/resnet-34's), as config.json records it.
HF_RESNET34 = {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [3, 4, 6, 3], "layer_type": "basic"}


def _pickled_model(error: BaseException) -> str | None:
    """The class a refused pickle holds, where it is a whole model (``torch.save(model)``), else None."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found and not found.group(1).startswith(("collections.", "builtins.")) else None


def _read_huggingface_config(folder: Path) -> None:
    """Refuse a transformers folder that is not a ResNet-34 of basic blocks, naming the setting that differs."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise WeightFileError(f"{folder}: config.json is not readable JSON ({first_line(error)})") from None
    if config.get("model_type") != "resnet":
        raise WeightFileError(
            f"{folder}: a transformers {config.get('model_type')!r} model; expected model_type 'resnet'"
        )
    for key, value in HF_RESNET34.items():
        if config.get(key) != value:
            raise WeightFileError(
                f"{folder}: config.json {key}={config.get(key)!r}; a ResNet-34 of basic blocks has {value!r}"
            )
    for key, value in (("hidden_act", "relu"), ("downsample_in_first_stage", False)):
        if config.get(key, value) != value:
            raise WeightFileError(f"{folder}: config.json {key}={config.get(key)!r}; ResNet-34 here has {value!r}")


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_source(path, "torch")  # a state dict's file, or a Hugging Face folder with its config and weights
    if path.is_dir():
        _read_huggingface_config(path)
        path = next(path / name for name in HF_WEIGHTS if (path / name).is_file())
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        whole = _pickled_model(error)
        if whole is not None:  # torch.save(model): the model's class is pickled, and would run if loaded
            raise WeightFileError(
                f"{path}: refused: a whole pickled {whole}, not a state_dict (read with weights_only=True, nothing "
                "in it was run); in your own trusted environment: torch.save(torch.load(PATH, "
                "weights_only=False).state_dict(), 'state_dict.pt')"
            ) from None
        # torch's safe unpickler stops at the first thing that is not plain tensor data; a corrupt file
        # and one carrying code often fail at the same opcode, so the message covers both.
        raise WeightFileError(
            f"{path}: refused: not a plain tensor state_dict (read with weights_only=True, nothing in it was "
            "run; it is corrupt, truncated, or pickles Python objects); expected torch.save(model.state_dict())"
        ) from None
    except Exception as error:  # corrupt, truncated, or a pickle of something other than tensors
        raise WeightFileError(f"{path}: not a readable {path.suffix} state_dict ({first_line(error)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint (Lightning's .ckpt): {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightFileError(
            f"{path}: expected a state_dict (a mapping of names to tensors); found {type(state).__name__}"
        )
    return dict(state), metadata


def load_torch(
    path: str | os.PathLike, classifier_activation: str | None = HEAD_AUTO, notes: list[str] | None = None
) -> torch_impl.ResNet34:
    """Load a ResNet-34 from a .pt, .pth, .ckpt, .bin or .safetensors state_dict, or a transformers folder.

    Any layout and prefix ``conversion.state_dicts.read_state_dict`` reads (the twin's names, torchvision's / timm's,
    transformers', under ``module.`` or a Lightning module's attribute). The head's activation comes from the file's
    metadata where it records one, else ``classifier_activation`` (None: logits), and by default (``HEAD_AUTO``) logits
    for torchvision's, timm's and transformers' layouts (they compute logits) and softmax for the twin's (the book's
    head). ``notes`` receives a
    line on what was read where it is more than a plain state dict.
    """
    path = Path(path)
    state, metadata = _read_state_dict(path)
    read = read_state_dict(state, str(path))
    if notes is not None and read.note():
        notes.append(f"{path}: {read.note()}")
    default = "softmax" if read.layout == "twin" else None
    head = metadata.get(
        "classifier_activation", default if classifier_activation == HEAD_AUTO else classifier_activation
    )
    return twin_from_state_dict(
        read,
        classifier_activation=None if head in (None, "linear") else head,
        activation=metadata.get("activation", "relu"),
        source=str(path),
    )


def save_huggingface(model: torch_impl.ResNet34, folder: str | os.PathLike, notes: list[str] | None = None) -> Path:
    """Write a transformers ``ResNetForImageClassification`` folder (config.json, model.safetensors), atomically.

    transformers' ResNet computes the torchvision convention (symmetric padding, BatchNorm epsilon 1e-5) with ReLU
    units, and returns logits: a model of another convention or activation is refused, naming what differs; a
    head activation (the book's softmax) is left to the user, and ``notes`` says so.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if model.convention != "torchvision":
        raise ConversionError(
            f"{folder}: transformers' ResNet computes the torchvision convention; this model computes the "
            f"{model.convention} one (convert with --convention torchvision to write it; its function changes)"
        )
    if model.activation_name != "relu":
        raise ConversionError(
            f"{folder}: transformers' ResNet has ReLU units; this model has {model.activation_name!r} units"
        )
    if model.classifier_activation not in (None, "linear") and notes is not None:
        notes.append(
            f"{folder}: transformers' ResNet returns logits; this model's {model.classifier_activation} head is "
            "applied to them, outside the folder"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise WeightFileError(f"{folder}: exists and is not an empty folder; expected a new folder for save_pretrained")
    if not folder.parent.is_dir():
        raise WeightFileError(f"{folder}: the folder {folder.parent} does not exist")
    dtype = next(t.dtype for t in model.state_dict().values() if t.is_floating_point())
    labels = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
    config = {
        "architectures": ["ResNetForImageClassification"],
        "model_type": "resnet",
        **HF_RESNET34,
        "hidden_act": "relu",
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,
        "num_channels": model.in_channels,
        "id2label": labels,
        "label2id": {name: int(i) for i, name in labels.items()},
        "dtype": str(dtype).removeprefix("torch."),
    }
    state = {
        torchvision_to_huggingface_key(k): v.detach().cpu().contiguous()
        for k, v in torchvision_state_dict(model).items()
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_torch(model: torch_impl.ResNet34, path: str | os.PathLike) -> Path:
    """Write the model's state_dict as .pt / .pth (torch.save) or .safetensors, atomically.

    A torchvision-convention model is written with torchvision's key names, so
    ``torchvision.models.resnet34(num_classes=N).load_state_dict(torch.load(path), strict=True)`` works.
    """
    path = Path(path)
    if not path.name.endswith(TORCH_SUFFIXES):
        raise WeightFileError(f"{path}: expected a {', '.join(TORCH_SUFFIXES)} destination")
    state = torchvision_state_dict(model) if model.convention == "torchvision" else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {
                "format": "pt",
                "architecture": "torch_impl.ResNet34",
                "convention": model.convention,
                "classifier_activation": model.classifier_activation or "linear",
                "activation": model.activation_name,
            }
            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
    return path
