"""Weight files by extension: Keras (.keras / .h5 / .weights.h5, ``conversion.keras_files``) and torch (.pt / .pth /
.ckpt / .bin / .safetensors and Hugging Face folders, ``conversion.torch_files``); ``convert_file`` between any two.

Loading never runs code from a file, and writing is atomic (``conversion.file_io``).
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

import torch_impl
from conversion.file_io import (
    HEAD_AUTO,
    HF_WEIGHTS,
    KERAS_SUFFIXES,
    TORCH_SUFFIXES,
    atomic_output,
    check_destination,
    file_kind,
    is_huggingface_folder,
)
from conversion.keras_files import load_keras, save_keras
from conversion.state_dicts import (
    function_change,
    with_convention,
)
from conversion.torch_files import load_torch, save_huggingface, save_torch
from conversion.weights import keras_to_torch, torch_to_keras, torch_to_keras_hub

__all__ = [
    "HEAD_AUTO",
    "HF_WEIGHTS",
    "KERAS_SUFFIXES",
    "TORCH_SUFFIXES",
    "atomic_output",
    "convert_file",
    "convert_loaded",
    "file_kind",
    "is_huggingface_folder",
    "load_keras",
    "load_model",
    "load_torch",
    "save_huggingface",
    "save_keras",
    "save_torch",
]


def load_model(
    path: str | os.PathLike, classifier_activation: str | None = HEAD_AUTO, notes: list[str] | None = None
) -> keras.Model | torch_impl.ResNet34:
    """A Keras model or torch ResNet34, by the file's extension (a folder: Hugging Face's ``save_pretrained``).

    ``classifier_activation`` is the head of a file that records none (None: logits; ``HEAD_AUTO``: softmax for
    Keras weights and the twin's state dicts, which hold the book's model, logits for torchvision's, timm's and
    transformers').
    """
    if file_kind(path) == "keras":
        return load_keras(path, classifier_activation, notes)
    return load_torch(path, classifier_activation, notes)


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    input_size: tuple[int, int] | None = None,
    classifier_activation: str | None = HEAD_AUTO,
    convention: str | None = None,
    keras_hub: bool = False,
    notes: list[str] | None = None,
) -> tuple[Path, dict | None]:
    """Convert between any two of .keras, .h5, .weights.h5, .pt, .pth, .ckpt, .bin, .safetensors and Hugging Face
    folders (atomic write); ``keras_hub`` writes a .keras destination as keras-hub's ResNetImageClassifier.

    Returns the written path and, where ``convention`` changes the source's on purpose, how much the function
    changed (``conversion.state_dicts.function_change``); None when the function is kept.
    ``input_size`` (H, W) fixes a Keras destination's input size (default: the source's, or any size).
    ``notes`` receives a line for each thing read or written that is more than a plain copy.
    """
    check_destination(dst, keras_hub)  # before the (slow) load, not after
    model = load_model(src, classifier_activation, notes)
    return convert_loaded(
        model, src, dst, input_size=input_size, convention=convention, keras_hub=keras_hub, notes=notes
    )


def convert_loaded(
    model: keras.Model | torch_impl.ResNet34,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    input_size: tuple[int, int] | None = None,
    convention: str | None = None,
    keras_hub: bool = False,
    notes: list[str] | None = None,
) -> tuple[Path, dict | None]:
    """``convert_file`` for a source already read by ``load_model(src)`` (or ``load_keras`` / ``load_torch``)."""
    check_destination(dst, keras_hub)
    dst_kind = file_kind(dst)
    twin = keras_to_torch(model) if isinstance(model, keras.Model) else model  # bit-exact, source convention
    if isinstance(model, keras.Model) and not twin.num_classes and notes is not None:  # (torch files say it on read)
        notes.append(
            f"{src}: no classifier: read as ResNet-34's trunk alone (its output is the 512-channel feature map)"
        )
    target = with_convention(twin, convention)
    change = None if target is twin else function_change(twin, target, input_size or (224, 224))
    if dst_kind == "torch":
        return save_torch(target, dst), change
    if dst_kind == "huggingface":
        return save_huggingface(target, dst, notes), change
    if input_size is None:
        input_size = tuple(model.input_shape[1:3]) if isinstance(model, keras.Model) else (None, None)
    if keras_hub:
        return save_keras(torch_to_keras_hub(target, (*input_size, target.in_channels)), dst), change
    return save_keras(torch_to_keras(target, (*input_size, target.in_channels)), dst), change
