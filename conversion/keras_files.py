"""Keras weight files: .keras, .h5 (a whole model, or Keras 2 weights alone) and .weights.h5.

Loading never runs code from a file: Keras ``safe_mode`` on, and a model's config is read first and refused unless
every layer is one ResNet-34 is made of. The book's own ``ResidualUnit`` (a class the loader has never seen) is
recognised by its config, which must match the book's signature, and read with the project's layer of the same
design; keras-hub's ResNet-34 is recognised by its config too. The weights that land are then checked against the
file's own arrays; a compiled model's optimizer and metric state is named and set aside.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import keras
import numpy as np

import keras_impl
from conversion.arrays import array_sha256
from conversion.errors import ConversionError, WeightFileError
from conversion.file_io import HEAD_AUTO, KERAS_SUFFIXES, atomic_output, first_line, require_file
from conversion.keras_hub_models import KERAS_HUB_RESNET34
from conversion.keras_reader import describe_keras, read_keras
from keras_impl.layers import random_draws_skipped

# The layers a ResNet-34 of the book's design is made of; anything else in a Keras config is refused unread.
_KERAS_CLASSES = {
    "Sequential", "Functional", "InputLayer", "Conv2D", "BatchNormalization", "Activation", "ReLU", "Softmax",
    "MaxPooling2D", "MaxPool2D", "GlobalAveragePooling2D", "GlobalAvgPool2D", "Flatten", "Dense",
    "Add", "ZeroPadding2D", "Dropout",  # a Functional graph of residual branches (keras-hub's, or your own)
}  # fmt: skip
_KERAS_HUB_PREPROCESSORS = {"keras_hub>ResNetImageClassifierPreprocessor"}
# A Keras 3 weights file's groups: the model's weights, and the training state a compiled model adds.
_MODEL_STATE, _TRAINING_STATE = ("layers", "vars"), ("optimizer", "metrics")
# The book's ResidualUnit(filters, strides=1, activation="relu", **kwargs), as Keras records it.
_BOOK_UNIT_CONFIG = {"name", "trainable", "dtype", "filters", "strides", "activation"}
_OWN_LAYERS = {"resnet34_parity>ResidualUnit", "resnet34_parity>SymmetricPaddingConv2D"}
_OWN_LAYERS |= {"resnet34_parity>SymmetricPaddingMaxPool2D"}


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
        if str(registered).startswith("keras_hub>"):
            _keras_hub_resnet34(layer, where)
            _import_keras_hub(where)
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


def _import_keras_hub(where: str) -> None:
    """keras-hub's classes register themselves on import; the file's config names them, it never supplies them."""
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        raise WeightFileError(
            f"{where}: a keras-hub model; install keras-hub to read it (pip install --no-deps keras-hub)"
        ) from None


def _array_digests(arrays: Iterable[np.ndarray]) -> collections.Counter:
    return collections.Counter(array_sha256(array) for array in arrays)


def _h5_arrays(group: h5py.Group) -> list[np.ndarray]:
    arrays: list[np.ndarray] = []
    group.visititems(lambda _, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def _check_weights_landed(loaded: list[np.ndarray], file_arrays: list[np.ndarray], path: Path) -> None:
    """Every array of the file is in exactly one variable of the loaded model (``loaded``: their values), and vice
    versa."""
    if _array_digests(loaded) != _array_digests(file_arrays):
        raise WeightFileError(
            f"{path}: the loaded model's {len(loaded)} variables do not hold the file's "
            f"{len(file_arrays)} arrays; expected every stored weight to land in the model"
        )


def _checked_model(model: object, file_arrays: list[np.ndarray], path: Path) -> keras.Model:
    """The loaded model, once every array of the file landed in it, it reads as a ResNet-34 and its weights are
    finite. Each variable is copied out once for both checks (0.05-0.3 s for a ResNet-34 here)."""
    if not isinstance(model, keras.Model):  # before anything reads its variables
        raise WeightFileError(f"{path}: expected a Keras model; found {type(model).__name__}")
    loaded = [keras.ops.convert_to_numpy(variable) for variable in model.weights]
    _check_weights_landed(loaded, file_arrays, path)
    try:
        read_keras(model)
    except ConversionError as error:
        raise WeightFileError(f"{path}: {error}") from None
    for variable, value in zip(model.weights, loaded, strict=True):
        if not np.all(np.isfinite(value)):
            raise WeightFileError(f"{path}: tensor {variable.path} holds NaN or Inf; expected finite weights")
    return model


def _group_arrays(handle: h5py.File, keys: tuple[str, ...]) -> list[np.ndarray]:
    return [array for key in keys if key in handle for array in _h5_arrays(handle[key])]


def _set_aside(handle: h5py.File, path: Path, notes: list[str] | None) -> None:
    """Name the training state a Keras 3 weights file holds beside the model's weights (optimizer slots, metrics)."""
    counts = {key: len(_h5_arrays(handle[key])) for key in _TRAINING_STATE if key in handle}
    if notes is not None and any(counts.values()):
        held = ", ".join(f"{count} {key} arrays" for key, count in counts.items() if count)
        notes.append(f"{path}: set aside the training state it also holds ({held}); the model's weights were read")


def _load_weights_file(
    path: Path, classifier_activation: str | None, notes: list[str] | None
) -> tuple[keras.Model, list[np.ndarray]]:
    """``.weights.h5`` (no architecture inside): build ResNet-34 to the file's shapes, then load by structure.
    Returns the model and the file's arrays of it, for ``_checked_model``."""
    try:
        with h5py.File(path, "r") as handle:
            if "layers" not in handle and "layer_names" in handle.attrs:  # an older tf_keras wrote Keras 2's layout
                return _load_keras2_weights(path, handle, classifier_activation, notes)
            stem_name = "symmetric_padding_conv2d" if "layers/symmetric_padding_conv2d" in handle else "conv2d"
            stem, kernel = handle[f"layers/{stem_name}/vars/0"], handle["layers/dense/vars/0"]
            num_classes, in_channels, dtype = kernel.shape[1], stem.shape[2], str(kernel.dtype)
            file_arrays = _group_arrays(handle, _MODEL_STATE)
            _set_aside(handle, path, notes)
        convention = "torchvision" if stem_name == "symmetric_padding_conv2d" else "book"
        model = keras_impl.build_resnet34(  # not initialised: every weight must come from the file (checked below)
            num_classes,
            (None, None, in_channels),
            classifier_activation,
            dtype,
            convention=convention,
            initialize_weights=False,
        )
        with warnings.catch_warnings():  # Keras warns that the optimizer's arrays find no optimizer
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except WeightFileError:
        raise
    except Exception as error:
        raise WeightFileError(f"{path}: not ResNet-34 .weights.h5 weights ({first_line(error)})") from None
    return model, file_arrays


def _names(attribute: object) -> list[str]:
    return [name.decode() if isinstance(name, bytes) else str(name) for name in attribute]


def _keras2_weight_groups(handle: h5py.File) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(owner, {variable: array}) of each layer with weights, in the file's order (Keras 2 ``save_weights``).

    Keras 2 names a unit's weights ``residual_unit_3/conv2d_7/kernel:0``, trainable ones first; grouping them by
    their owner in order of first appearance gives the sublayers in the order the unit tracked them.
    """
    groups: dict[str, dict[str, np.ndarray]] = {}
    for layer_name in _names(handle.attrs["layer_names"]):
        group = handle[layer_name]
        for weight_name in _names(group.attrs.get("weight_names", [])):
            owner, _, variable = weight_name.rpartition("/")
            groups.setdefault(owner or layer_name, {})[variable.split(":")[0]] = group[weight_name][()]
    return list(groups.items())


def _load_keras2_weights(
    path: Path, handle: h5py.File, classifier_activation: str | None, notes: list[str] | None
) -> tuple[keras.Model, list[np.ndarray]]:
    """A Keras 2 weights-only HDF5 file: its layers' weights, in order, into the book's ResNet-34. Returns the
    model and the file's arrays, for ``_checked_model``."""
    groups = _keras2_weight_groups(handle)
    stem, head = (groups[0][1].get("kernel"), groups[-1][1].get("kernel")) if groups else (None, None)
    if stem is None or head is None or stem.ndim != 4 or head.ndim != 2:
        raise WeightFileError(
            f"{path}: a Keras 2 weights file whose first and last layers are not a conv and a Dense; expected "
            "ResNet-34's"
        )
    model = keras_impl.build_resnet34(  # not initialised: every weight is assigned from the file below
        head.shape[1],
        (None, None, stem.shape[2]),
        classifier_activation,
        str(head.dtype),
        convention="book",
        initialize_weights=False,
    )
    resnet = read_keras(model)
    targets = [resnet.layers[slot.name] for slot in resnet.slots if slot.kind in ("conv", "batch_norm", "dense")]
    if len(groups) != len(targets):
        raise WeightFileError(
            f"{path}: {len(groups)} layers with weights ('{groups[0][0]}' ... '{groups[-1][0]}'); ResNet-34 has "
            f"{len(targets)}"
        )
    for (owner, arrays), target in zip(groups, targets, strict=True):
        variables = {variable.name: variable for variable in target.layer.weights}
        if set(arrays) != set(variables):
            raise WeightFileError(
                f"{path}: '{owner}' holds {sorted(arrays)}; ResNet-34's {describe_keras(target.layer)} there holds "
                f"{sorted(variables)}"
            )
        for name, variable in variables.items():
            if arrays[name].shape != tuple(variable.shape):
                raise WeightFileError(
                    f"{path}: '{owner}/{name}' has shape {arrays[name].shape}; ResNet-34's "
                    f"{describe_keras(target.layer)} there needs {tuple(variable.shape)}"
                )
            variable.assign(arrays[name])
    if notes is not None:
        notes.append(
            f"{path}: a Keras 2 weights-only file, read by its {len(groups)} layers in order as the book's "
            "ResNet-34 (it records no architecture: TF 'same' padding and BatchNorm epsilon 1e-3 assumed)"
        )
    return model, [array for _, arrays in groups for array in arrays.values()]


def _keras_hub_resnet34(layer: dict, where: str) -> None:
    """Refuse a keras-hub object unless it is a ResNet-34 of basic blocks (checked on its config, nothing run)."""
    registered, config = layer.get("registered_name"), layer["config"]
    if registered == "keras_hub>ResNetImageClassifier":
        backbone, preprocessor = config.get("backbone"), config.get("preprocessor")
        if not isinstance(backbone, dict) or backbone.get("registered_name") != "keras_hub>ResNetBackbone":
            raise WeightFileError(f"{where}: a ResNetImageClassifier without a ResNetBackbone; refused")
        if preprocessor is not None and preprocessor.get("registered_name") not in _KERAS_HUB_PREPROCESSORS:
            raise WeightFileError(
                f"{where}: a preprocessor of class {preprocessor.get('class_name')}; expected none or keras-hub's "
                "ResNet preprocessor"
            )
        return _keras_hub_resnet34(backbone, where)
    if registered != "keras_hub>ResNetBackbone":
        raise WeightFileError(f"{where}: keras-hub class {registered} is not a ResNet-34; refused without running it")
    for key, value in KERAS_HUB_RESNET34.items():
        if config.get(key) != value:
            raise WeightFileError(
                f"{where}: a keras-hub ResNetBackbone with {key}={config.get(key)!r}; ResNet-34 has {value!r}"
            )


def load_keras(
    path: str | os.PathLike, classifier_activation: str | None = HEAD_AUTO, notes: list[str] | None = None
) -> keras.Model:
    """Load a ResNet-34 from .keras, .h5 (a whole model, or Keras 2 weights alone), or .weights.h5.

    Ours, the book's own code (Keras 3 or tf_keras), keras-hub's ResNetBackbone / ResNetImageClassifier. A file
    of weights alone records no head: ``classifier_activation`` gives it (None: logits; ``HEAD_AUTO``: softmax, the
    book's). ``notes`` receives a line on what was
    read where it is more than the model (a compiled model's optimizer state, set aside; Keras 2's layout).
    """
    path = Path(path)
    require_file(path, KERAS_SUFFIXES)
    if classifier_activation == HEAD_AUTO:
        classifier_activation = "softmax"
    if path.name.endswith(".weights.h5"):
        return _checked_model(*_load_weights_file(path, classifier_activation, notes), path)
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
                    file_arrays = _group_arrays(handle, _MODEL_STATE)
                    _set_aside(handle, path, notes)
        except Exception as error:
            raise WeightFileError(f"{path}: not a readable .keras archive ({first_line(error)})") from None
    else:
        try:
            with h5py.File(path, "r") as handle:
                if "model_config" not in handle.attrs and "layer_names" in handle.attrs:  # tf_keras save_weights
                    return _checked_model(*_load_keras2_weights(path, handle, classifier_activation, notes), path)
                if "model_config" not in handle.attrs:
                    raise WeightFileError(
                        f"{path}: an HDF5 file without a model config or Keras 2 layer groups; expected "
                        "model.save('x.h5') or model.save_weights"
                    )
                config = json.loads(handle.attrs["model_config"])
                file_arrays = _h5_arrays(handle["model_weights"])
        except WeightFileError:
            raise
        except Exception as error:
            raise WeightFileError(f"{path}: not a readable HDF5 Keras model ({first_line(error)})") from None
    custom_objects = _custom_objects(config, path)
    try:
        # Keras builds the whole model before it reads the file: its kernels start at zero instead of being drawn,
        # and a weight the file does not fill is caught below (every stored array must land in one variable).
        with warnings.catch_warnings(), random_draws_skipped():  # legacy .h5 warns that it is legacy; the user knows
            warnings.simplefilter("ignore")
            if path.suffix == ".keras":
                model = keras.saving.load_model(path, custom_objects=custom_objects, safe_mode=True)
            else:
                model = keras.saving.load_model(path, custom_objects=custom_objects)
    except Exception as error:
        raise WeightFileError(f"{path}: could not load the {path.suffix} model ({first_line(error)})") from None
    return _checked_model(model, file_arrays, path)


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
