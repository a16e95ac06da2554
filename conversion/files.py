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
import re
import shutil
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
from conversion.keras_hub_models import KERAS_HUB_RESNET34
from conversion.keras_reader import describe_keras, read_keras
from conversion.state_dicts import (
    function_change,
    read_state_dict,
    torchvision_state_dict,
    torchvision_to_huggingface_key,
    twin_from_state_dict,
    with_convention,
)
from conversion.weights import keras_to_torch, torch_to_keras, torch_to_keras_hub

KERAS_SUFFIXES = (".keras", ".weights.h5", ".h5")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")  # .ckpt: Lightning; .bin: transformers' weights
# A Hugging Face transformers folder (save_pretrained): its config and one of its weight files.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# The head a file that records none gets by default: softmax for the book's (Keras weights, the twin's state dicts),
# logits for torchvision's, timm's and transformers' layouts. None asks for logits everywhere.
HEAD_AUTO = "auto"
# The transformers ResNetConfig of a ResNet-34 of basic blocks (microsoft/resnet-34's), as config.json records it.
HF_RESNET34 = {"embedding_size": 64, "hidden_sizes": [64, 128, 256, 512], "depths": [3, 4, 6, 3], "layer_type": "basic"}
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


def is_huggingface_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder transformers' ``save_pretrained`` wrote (config.json and a weight file)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHTS)


def file_kind(path: str | os.PathLike) -> str:
    """'keras', 'torch' or 'huggingface' (a save_pretrained folder, or a destination without an extension)."""
    path = Path(path)
    if is_huggingface_folder(path) or (not path.suffix and not path.is_file()):
        return "huggingface"
    if path.name.endswith(KERAS_SUFFIXES):
        return "keras"
    if path.name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise WeightFileError(
        f"{path}: unknown extension; expected one of {', '.join(KERAS_SUFFIXES + TORCH_SUFFIXES)}, or a Hugging Face "
        "folder"
    )


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


def _pickled_model(error: BaseException) -> str | None:
    """The class a refused pickle holds, where it is a whole model (``torch.save(model)``), else None."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found and not found.group(1).startswith(("collections.", "builtins.")) else None


def _read_huggingface_config(folder: Path) -> None:
    """Refuse a transformers folder that is not a ResNet-34 of basic blocks, naming the setting that differs."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise WeightFileError(f"{folder}: config.json is not readable JSON ({_first_line(error)})") from None
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
    if path.is_dir():
        if not is_huggingface_folder(path):
            raise WeightFileError(f"{path}: a folder without config.json and {' or '.join(HF_WEIGHTS)}")
        _read_huggingface_config(path)
        path = next(path / name for name in HF_WEIGHTS if (path / name).is_file())
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
        raise WeightFileError(f"{path}: not a readable {path.suffix} state_dict ({_first_line(error)})") from None
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


def _group_arrays(handle: h5py.File, keys: tuple[str, ...]) -> list[np.ndarray]:
    return [array for key in keys if key in handle for array in _h5_arrays(handle[key])]


def _set_aside(handle: h5py.File, path: Path, notes: list[str] | None) -> None:
    """Name the training state a Keras 3 weights file holds beside the model's weights (optimizer slots, metrics)."""
    counts = {key: len(_h5_arrays(handle[key])) for key in _TRAINING_STATE if key in handle}
    if notes is not None and any(counts.values()):
        held = ", ".join(f"{count} {key} arrays" for key, count in counts.items() if count)
        notes.append(f"{path}: set aside the training state it also holds ({held}); the model's weights were read")


def _load_weights_file(path: Path, classifier_activation: str | None, notes: list[str] | None) -> keras.Model:
    """``.weights.h5`` (no architecture inside): build ResNet-34 to the file's shapes, then load by structure."""
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
        model = keras_impl.build_resnet34(
            num_classes, (None, None, in_channels), classifier_activation, dtype, convention=convention
        )
        with warnings.catch_warnings():  # Keras warns that the optimizer's arrays find no optimizer
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except WeightFileError:
        raise
    except Exception as error:
        raise WeightFileError(f"{path}: not ResNet-34 .weights.h5 weights ({_first_line(error)})") from None
    _check_weights_landed(model, file_arrays, path)
    return model


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
) -> keras.Model:
    """A Keras 2 weights-only HDF5 file: its layers' weights, in order, into the book's ResNet-34."""
    groups = _keras2_weight_groups(handle)
    stem, head = (groups[0][1].get("kernel"), groups[-1][1].get("kernel")) if groups else (None, None)
    if stem is None or head is None or stem.ndim != 4 or head.ndim != 2:
        raise WeightFileError(
            f"{path}: a Keras 2 weights file whose first and last layers are not a conv and a Dense; expected "
            "ResNet-34's"
        )
    model = keras_impl.build_resnet34(
        head.shape[1], (None, None, stem.shape[2]), classifier_activation, str(head.dtype), convention="book"
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
    _check_weights_landed(model, [a for _, arrays in groups for a in arrays.values()], path)
    if notes is not None:
        notes.append(
            f"{path}: a Keras 2 weights-only file, read by its {len(groups)} layers in order as the book's "
            "ResNet-34 (it records no architecture: TF 'same' padding and BatchNorm epsilon 1e-3 assumed)"
        )
    return model


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
    _require_file(path, KERAS_SUFFIXES)
    if classifier_activation == HEAD_AUTO:
        classifier_activation = "softmax"
    if path.name.endswith(".weights.h5"):
        return _checked_model(_load_weights_file(path, classifier_activation, notes), path)
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
            raise WeightFileError(f"{path}: not a readable .keras archive ({_first_line(error)})") from None
    else:
        try:
            with h5py.File(path, "r") as handle:
                if "model_config" not in handle.attrs and "layer_names" in handle.attrs:  # tf_keras save_weights
                    return _checked_model(_load_keras2_weights(path, handle, classifier_activation, notes), path)
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
    dst_kind = file_kind(dst)
    if not Path(dst).parent.is_dir():  # fail before the (slow) load, not after
        raise WeightFileError(f"{dst}: the folder {Path(dst).parent} does not exist")
    if keras_hub and Path(dst).suffix != ".keras":
        raise WeightFileError(f"{dst}: keras-hub's models are written as .keras files; expected a .keras destination")
    model = load_model(src, classifier_activation, notes)
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
