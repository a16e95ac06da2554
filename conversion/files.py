"""Weight files by extension: .keras / .weights.h5 (Keras) and .pt / .safetensors (torch state_dict).

Loading never runs pickled code (``torch.load(weights_only=True)``, Keras ``safe_mode``, numpy without
pickles); writing goes to a temporary file in the destination folder and is renamed into place only
once complete, so a failure leaves no file behind.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import keras
import numpy as np
import torch

import keras_impl
import torch_impl
from conversion.errors import WeightFileError
from conversion.weights import keras_to_torch, torch_to_keras

KERAS_SUFFIXES = (".keras", ".weights.h5")
TORCH_SUFFIXES = (".pt", ".safetensors")


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


def _check_finite(named_arrays: Iterator[tuple[str, np.ndarray]], path: Path) -> None:
    for name, array in named_arrays:
        if not np.all(np.isfinite(array)):
            raise WeightFileError(f"{path}: tensor {name} holds NaN or Inf; expected finite weights")


def _require_file(path: Path, suffixes: tuple[str, ...]) -> None:
    if not path.name.endswith(suffixes):
        raise WeightFileError(f"{path}: expected a {' or '.join(suffixes)} file")
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")


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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightFileError(f"{path}: not a readable {path.suffix} state_dict ({reason[:160]})") from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightFileError(
            f"{path}: expected a state_dict (a mapping of names to tensors); found {type(state).__name__}"
        )
    return dict(state), metadata


def state_dict_to_torch(
    state: Mapping[str, torch.Tensor],
    classifier_activation: str | None = "softmax",
    activation: str = "relu",
    source: str = "state_dict",
) -> torch_impl.ResNet34:
    """A torch_impl.ResNet34 holding ``state``, after checking names and shapes (one-line errors)."""
    for key in ("stem_conv.weight", "classifier.weight"):
        if key not in state:
            sample = ", ".join(list(state)[:3])
            raise WeightFileError(
                f"{source}: not a torch_impl.ResNet34 state_dict: no '{key}' "
                f"(found {len(state)} tensors: {sample}, ...)"
            )
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise WeightFileError(f"{source}: expected floating tensors of one dtype; found {sorted(map(str, dtypes))}")
    model = torch_impl.ResNet34(
        num_classes=state["classifier.weight"].shape[0],
        in_channels=state["stem_conv.weight"].shape[1],
        classifier_activation=classifier_activation,
        activation=activation,
    ).to(dtypes.pop())
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightFileError(
            f"{source}: not a torch_impl.ResNet34 state_dict: {len(missing)} tensors missing "
            f"({', '.join(missing[:2])}...), {len(unexpected)} unexpected ({', '.join(unexpected[:2])}...)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightFileError(
                f"{source}: {key} has shape {tuple(tensor.shape)}; ResNet34 expects {tuple(expected[key].shape)}"
            )
    _check_finite(((k, v.float().numpy()) for k, v in state.items() if v.is_floating_point()), Path(source))
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent; all else checked above
    return model.eval()


def load_torch(path: str | os.PathLike, classifier_activation: str | None = "softmax") -> torch_impl.ResNet34:
    """Load a .pt or .safetensors ResNet34 state_dict (its head activation from metadata, else the argument)."""
    path = Path(path)
    state, metadata = _read_state_dict(path)
    return state_dict_to_torch(
        state,
        classifier_activation=metadata.get("classifier_activation", classifier_activation),
        activation=metadata.get("activation", "relu"),
        source=str(path),
    )


def save_torch(model: torch_impl.ResNet34, path: str | os.PathLike) -> Path:
    """Write the model's state_dict as .pt (torch.save) or .safetensors, atomically."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {
                "format": "pt",
                "architecture": "torch_impl.ResNet34",
                "classifier_activation": model.classifier.activation.keras_name,
                "activation": model.activation_name,
            }
            save_file(state, str(tmp), metadata=metadata)
        elif path.suffix == ".pt":
            torch.save(state, tmp)
        else:
            raise WeightFileError(f"{path}: expected a .pt or .safetensors destination")
    return path


# --- Keras side -----------------------------------------------------------------------------------


def _check_keras_model(model: object, path: Path) -> keras.Model:
    names = [layer.name for layer in getattr(model, "layers", [])]
    if not isinstance(model, keras.Model) or names[:1] != ["stem_conv"] or names[-1:] != ["classifier"]:
        raise WeightFileError(f"{path}: not a ResNet-34 from keras_impl.build_resnet34 (layers: {names[:3]}...)")
    _check_finite(((v.path, keras.ops.convert_to_numpy(v)) for v in model.weights), path)
    return model


def load_keras(path: str | os.PathLike, classifier_activation: str | None = "softmax") -> keras.Model:
    """Load a .keras model, or .weights.h5 weights into a freshly built ResNet-34 (shape read from the file)."""
    path = Path(path)
    _require_file(path, KERAS_SUFFIXES)
    if path.name.endswith(".weights.h5"):
        try:
            with h5py.File(path, "r") as handle:
                kernel = handle["layers/dense/vars/0"]
                stem = handle["layers/conv2d/vars/0"]
                num_classes, in_channels, dtype = kernel.shape[1], stem.shape[2], str(kernel.dtype)
            model = keras_impl.build_resnet34(num_classes, (None, None, in_channels), classifier_activation, dtype)
            model.load_weights(path)
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightFileError(f"{path}: not ResNet-34 .weights.h5 weights ({reason[:160]})") from None
        return _check_keras_model(model, path)
    if not zipfile.is_zipfile(path):
        raise WeightFileError(
            f"{path}: not a .keras archive (a .keras file is a zip; this one is truncated or corrupt)"
        )
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightFileError(f"{path}: could not load the .keras model ({reason[:160]})") from None
    return _check_keras_model(model, path)


def save_keras(model: keras.Model, path: str | os.PathLike) -> Path:
    """Write a .keras model or .weights.h5 weights, atomically."""
    path = Path(path)
    with atomic_output(path) as tmp:
        if path.name.endswith(".weights.h5"):
            model.save_weights(tmp)
        elif path.suffix == ".keras":
            model.save(tmp)
        else:
            raise WeightFileError(f"{path}: expected a .keras or .weights.h5 destination")
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
    input_size: tuple[int, int] = (224, 224),
    classifier_activation: str | None = "softmax",
) -> Path:
    """Convert between any two of .keras, .weights.h5, .pt and .safetensors (atomic write)."""
    dst_kind = file_kind(dst)
    if not Path(dst).parent.is_dir():  # fail before the (slow) load, not after
        raise WeightFileError(f"{dst}: the folder {Path(dst).parent} does not exist")
    model = load_model(src, classifier_activation)
    if dst_kind == "torch" and isinstance(model, keras.Model):
        model = keras_to_torch(model)
    elif dst_kind == "keras" and isinstance(model, torch_impl.ResNet34):
        model = torch_to_keras(model, (*input_size, model.in_channels))
    return save_torch(model, dst) if dst_kind == "torch" else save_keras(model, dst)
