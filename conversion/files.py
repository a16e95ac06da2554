"""Weight files by extension: .keras / .h5 / .weights.h5 (Keras) and .pt / .pth / .safetensors (torch).

Loading never runs code from a file: ``torch.load(weights_only=True)``; Keras ``safe_mode`` on; and a Keras
model's config is read first and refused unless every layer is one ResNet-34 is made of. The book's own
``ResidualUnit`` (a class the loader has never seen) is recognised by its config, which must match the
book's signature, and read with the project's layer of the same design; the weights that land are then
checked against the file's own arrays. Writing goes to a temporary file in the destination folder, renamed
into place only once complete, so a failure leaves no file behind.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import keras
import numpy as np
import torch

import keras_impl
import torch_impl
from conversion.errors import ConversionError, WeightFileError
from conversion.keras_reader import read_keras
from conversion.state_dicts import (
    function_change,
    state_dict_convention,
    torchvision_state_dict,
    twin_from_state_dict,
    with_convention,
)
from conversion.weights import keras_to_torch, torch_to_keras

KERAS_SUFFIXES = (".keras", ".weights.h5", ".h5")
TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")
# The layers a ResNet-34 of the book's design is made of; anything else in a Keras config is refused unread.
_KERAS_CLASSES = {
    "Sequential", "Functional", "InputLayer", "Conv2D", "BatchNormalization", "Activation", "ReLU", "Softmax",
    "MaxPooling2D", "MaxPool2D", "GlobalAveragePooling2D", "GlobalAvgPool2D", "Flatten", "Dense",
}  # fmt: skip
# The book's ResidualUnit(filters, strides=1, activation="relu", **kwargs), as Keras records it.
_BOOK_UNIT_CONFIG = {"name", "trainable", "dtype", "filters", "strides", "activation"}
_OWN_LAYERS = {"resnet34_parity>ResidualUnit", "resnet34_parity>SymmetricPaddingConv2D"}
_OWN_LAYERS |= {"resnet34_parity>SymmetricPaddingMaxPool2D"}


def file_kind(path: str | os.PathLike) -> str:
    """'keras' or 'torch' from the file name; a WeightFileError for anything else."""
    name = Path(path).name
    if name.endswith(KERAS_SUFFIXES):
        return "keras"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise WeightFileError(f"{path}: unknown extension; expected one of {', '.join(KERAS_SUFFIXES + TORCH_SUFFIXES)}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it to ``path`` only on success."""
    path = Path(path)
    if not path.parent.is_dir():
        raise WeightFileError(f"{path}: the folder {path.parent} does not exist")
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".weights.h5") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.unlink()  # some writers (Keras) refuse to overwrite; they create it themselves
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _require_file(path: Path, suffixes: tuple[str, ...]) -> None:
    if not path.name.endswith(suffixes):
        raise WeightFileError(f"{path}: expected a {', '.join(suffixes[:-1])} or {suffixes[-1]} file")
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


# --- torch side -----------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _require_file(path, TORCH_SUFFIXES)
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
    except pickle.UnpicklingError:
        # torch's safe unpickler stops at the first thing that is not plain tensor data; a corrupt file
        # and one carrying code often fail at the same opcode, so the message covers both.
        raise WeightFileError(
            f"{path}: refused: not a plain tensor state_dict (read with weights_only=True, nothing in it was "
            "run; it is corrupt, truncated, or pickles Python objects); expected torch.save(model.state_dict())"
        ) from None
    except Exception as error:  # corrupt, truncated, or a pickle of something other than tensors
        raise WeightFileError(f"{path}: not a readable {path.suffix} state_dict ({_first_line(error)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightFileError(
            f"{path}: expected a state_dict (a mapping of names to tensors); found {type(state).__name__}"
        )
    return dict(state), metadata


def load_torch(path: str | os.PathLike, classifier_activation: str | None = "softmax") -> torch_impl.ResNet34:
    """Load a .pt, .pth or .safetensors ResNet-34 state_dict: the twin's key names, or torchvision's / timm's.

    The head's activation comes from the file's metadata where it records one; torchvision's and timm's
    checkpoints compute logits, so theirs is None; otherwise ``classifier_activation``.
    """
    path = Path(path)
    state, metadata = _read_state_dict(path)
    if state_dict_convention(state) == "torchvision":
        classifier_activation = None
    head = metadata.get("classifier_activation", classifier_activation)
    return twin_from_state_dict(
        state,
        classifier_activation=None if head in (None, "linear") else head,
        activation=metadata.get("activation", "relu"),
        source=str(path),
    )


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
                "classifier_activation": model.classifier.activation.keras_name,
                "activation": model.activation_name,
            }
            save_file(state, str(tmp), metadata=metadata)
        else:
            torch.save(state, tmp)
    return path


# --- Keras side -----------------------------------------------------------------------------------


def _layer_configs(config: object) -> Iterator[dict]:
    """Every layer entry of a (possibly nested) Keras model config."""
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            yield config
            for layer in config["config"].get("layers", []):
                yield from _layer_configs(layer)
        else:
            yield from (c for value in config.values() for c in _layer_configs(value))


def _custom_objects(model_config: dict, path: Path) -> dict:
    """The classes a ResNet-34 config needs, after refusing anything that is not part of one (nothing is run)."""
    custom = {}
    for layer in _layer_configs(model_config):
        name, registered = layer["class_name"], layer.get("registered_name")
        where = f"{path}: layer '{layer['config'].get('name', '?')}'"
        if registered in _OWN_LAYERS or (name in _KERAS_CLASSES and registered in (None, name)):
            continue
        if name == "ResidualUnit":
            keys, activation = set(layer["config"]), layer["config"].get("activation", "relu")
            if not keys <= _BOOK_UNIT_CONFIG or not isinstance(activation, str):
                raise WeightFileError(
                    f"{where}: a ResidualUnit whose config {sorted(keys)} is not the book's "
                    "ResidualUnit(filters, strides, activation); refused without running it"
                )
            custom["ResidualUnit"] = keras_impl.ResidualUnit  # the same design, the same sublayer order
            continue
        raise WeightFileError(f"{where}: class {name} is not part of a ResNet-34; refused without running it")
    return custom


def _array_digests(arrays: Iterator[np.ndarray]) -> collections.Counter:
    return collections.Counter(
        (array.dtype.str, array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())
        for array in arrays
    )


def _h5_arrays(group: h5py.Group) -> list[np.ndarray]:
    arrays: list[np.ndarray] = []
    group.visititems(lambda _, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def _check_weights_landed(model: keras.Model, file_arrays: list[np.ndarray], path: Path) -> None:
    """Every array of the file is in exactly one variable of the loaded model, and vice versa."""
    loaded = _array_digests(keras.ops.convert_to_numpy(v) for v in model.weights)
    if loaded != _array_digests(iter(file_arrays)):
        raise WeightFileError(
            f"{path}: the loaded model's {len(model.weights)} variables do not hold the file's "
            f"{len(file_arrays)} arrays; expected every stored weight to land in the model"
        )


def _checked_model(model: object, path: Path) -> keras.Model:
    if not isinstance(model, keras.Model):
        raise WeightFileError(f"{path}: expected a Keras model; found {type(model).__name__}")
    try:
        read_keras(model)
    except ConversionError as error:
        raise WeightFileError(f"{path}: {error}") from None
    for variable in model.weights:
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(variable))):
            raise WeightFileError(f"{path}: tensor {variable.path} holds NaN or Inf; expected finite weights")
    return model


def _load_weights_file(path: Path, classifier_activation: str | None) -> keras.Model:
    """``.weights.h5`` (no architecture inside): build ResNet-34 to the file's shapes, then load by structure."""
    try:
        with h5py.File(path, "r") as handle:
            stem_name = "symmetric_padding_conv2d" if "layers/symmetric_padding_conv2d" in handle else "conv2d"
            stem, kernel = handle[f"layers/{stem_name}/vars/0"], handle["layers/dense/vars/0"]
            num_classes, in_channels, dtype = kernel.shape[1], stem.shape[2], str(kernel.dtype)
            file_arrays = _h5_arrays(handle)
        convention = "torchvision" if stem_name == "symmetric_padding_conv2d" else "book"
        model = keras_impl.build_resnet34(
            num_classes, (None, None, in_channels), classifier_activation, dtype, convention=convention
        )
        model.load_weights(path)
    except Exception as error:
        raise WeightFileError(f"{path}: not ResNet-34 .weights.h5 weights ({_first_line(error)})") from None
    _check_weights_landed(model, file_arrays, path)
    return model


def load_keras(path: str | os.PathLike, classifier_activation: str | None = "softmax") -> keras.Model:
    """Load a ResNet-34 from .keras, legacy full-model .h5, or .weights.h5 (ours or the book's own code).

    ``classifier_activation`` is used only for .weights.h5, which does not record the head.
    """
    path = Path(path)
    _require_file(path, KERAS_SUFFIXES)
    if path.name.endswith(".weights.h5"):
        return _checked_model(_load_weights_file(path, classifier_activation), path)
    if path.suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise WeightFileError(
                f"{path}: not a .keras archive (a .keras file is a zip; this one is truncated or corrupt)"
            )
        try:
            with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory() as folder:
                config = json.loads(archive.read("config.json"))
                # Extracted first: h5py reads a zip member through Python 15x slower than a file (1.6 s vs 0.1 s).
                with h5py.File(archive.extract("model.weights.h5", folder), "r") as handle:
                    # A compiled model's file holds its optimizer's slots too; only the model's are compared.
                    file_arrays = [a for key in handle if key != "optimizer" for a in _h5_arrays(handle[key])]
        except Exception as error:
            raise WeightFileError(f"{path}: not a readable .keras archive ({_first_line(error)})") from None
    else:
        try:
            with h5py.File(path, "r") as handle:
                if "model_config" not in handle.attrs:
                    raise WeightFileError(
                        f"{path}: an HDF5 file without a model config; weights alone go in a .weights.h5 file "
                        "(model.save_weights), a whole model in .h5 (model.save) or .keras"
                    )
                config = json.loads(handle.attrs["model_config"])
                file_arrays = _h5_arrays(handle["model_weights"])
        except WeightFileError:
            raise
        except Exception as error:
            raise WeightFileError(f"{path}: not a readable HDF5 Keras model ({_first_line(error)})") from None
    custom_objects = _custom_objects(config, path)
    try:
        with warnings.catch_warnings():  # legacy .h5 warns that it is legacy; the user knows
            warnings.simplefilter("ignore")
            if path.suffix == ".keras":
                model = keras.saving.load_model(path, custom_objects=custom_objects, safe_mode=True)
            else:
                model = keras.saving.load_model(path, custom_objects=custom_objects)
    except Exception as error:
        raise WeightFileError(f"{path}: could not load the {path.suffix} model ({_first_line(error)})") from None
    _check_weights_landed(model, file_arrays, path)
    return _checked_model(model, path)


def save_keras(model: keras.Model, path: str | os.PathLike) -> Path:
    """Write a .keras model, a legacy full-model .h5, or .weights.h5 weights, atomically."""
    path = Path(path)
    if not path.name.endswith(KERAS_SUFFIXES):
        raise WeightFileError(f"{path}: expected a {', '.join(KERAS_SUFFIXES)} destination")
    with atomic_output(path) as tmp:
        if path.name.endswith(".weights.h5"):
            model.save_weights(tmp)
        else:
            with warnings.catch_warnings():  # .h5: Keras warns that the format is legacy
                warnings.simplefilter("ignore")
                model.save(tmp)
    return path


# --- either -------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, classifier_activation: str | None = "softmax"):
    """A Keras model or torch ResNet34, by the file's extension."""
    loader = load_keras if file_kind(path) == "keras" else load_torch
    return loader(path, classifier_activation)


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    input_size: tuple[int, int] | None = None,
    classifier_activation: str | None = "softmax",
    convention: str | None = None,
) -> tuple[Path, dict | None]:
    """Convert between any two of .keras, .h5, .weights.h5, .pt, .pth and .safetensors (atomic write).

    Returns the written path and, where ``convention`` changes the source's on purpose, how much the function
    changed (``conversion.state_dicts.function_change``); None when the function is kept.
    ``input_size`` (H, W) fixes a Keras destination's input size (default: the source's, or any size).
    """
    dst_kind = file_kind(dst)
    if not Path(dst).parent.is_dir():  # fail before the (slow) load, not after
        raise WeightFileError(f"{dst}: the folder {Path(dst).parent} does not exist")
    model = load_model(src, classifier_activation)
    twin = keras_to_torch(model) if isinstance(model, keras.Model) else model  # bit-exact, source convention
    target = with_convention(twin, convention)
    change = None if target is twin else function_change(twin, target, input_size or (224, 224))
    if dst_kind == "torch":
        return save_torch(target, dst), change
    if input_size is None:
        input_size = tuple(model.input_shape[1:3]) if isinstance(model, keras.Model) else (None, None)
    return save_keras(torch_to_keras(target, (*input_size, target.in_channels)), dst), change
