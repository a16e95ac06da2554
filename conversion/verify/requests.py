"""What a ``verify`` or ``verify --train`` request names, checked before any framework loads.

Light on purpose (numpy and the standard library): a typo in a path, a zero step count or NCHW images fail in a
fraction of a second instead of after the ~6 s it takes to import TensorFlow and torch. ``verify_sources`` and
``prepare_training`` run the same checks again, so the library refuses what the command refuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from conversion.arrays import check_images
from conversion.errors import InputError
from conversion.file_io import HEAD_AUTO, check_source


@dataclass(frozen=True)
class Sources:
    """What to compare: Keras / torch / ONNX files (none: the seeded hostile twins) and the images."""

    keras: str | None = None  # .keras, .h5 or .weights.h5
    torch: str | None = None  # .pt, .pth or .safetensors
    onnx: str | None = None
    images: str | None = None  # an NHWC .npy array; default: seeded standard-normal images
    # For files that do not record the head (None: logits; HEAD_AUTO: each file's default, softmax for the twins).
    classifier_activation: str | None = HEAD_AUTO
    dtype: str | None = None  # default: float32 for the twins, the files' own for files
    seed: int = 0  # of the twins' weights, the images and the floor twins
    batch: int | None = None
    size: tuple[int, int] | None = None


@dataclass(frozen=True)
class TrainingChoice:
    """How ``verify --train`` trains: a named optimizer (default: the model's compiled one, else nesterov)."""

    optimizer: str | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    steps: int = 10


def read_images(path: str) -> np.ndarray:
    """An .npy array of images, checked for what needs no model (rank, float dtype, finite values): read before the
    models load, so that bad images fail in a moment; the channels and size are checked against the model after."""
    try:
        images = np.load(path, allow_pickle=False)  # never unpickle
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy array of images ({error})") from None
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InputError(f"expected images of rank 4 (N, H, W, C); received shape {np.shape(images)}")
    if images.dtype not in (np.float32, np.float64):
        raise InputError(f"expected float32 or float64 images; received {images.dtype}")
    if not np.all(np.isfinite(images)):
        raise InputError(f"expected finite images; received {int((~np.isfinite(images)).sum())} NaN/Inf values")
    return images


def _check_training(sources: Sources, choice: TrainingChoice) -> None:
    if choice.steps < 1:
        raise InputError(f"--steps must be a positive integer; received {choice.steps}")
    for flag, value in (("--learning-rate", choice.learning_rate), ("--weight-decay", choice.weight_decay)):
        if value is not None and (not math.isfinite(value) or value < 0 or (flag == "--learning-rate" and value == 0)):
            raise InputError(f"{flag} must be a finite positive number; received {value}")
    if sources.onnx:
        raise InputError("--train compares training steps; an ONNX file has none (drop --onnx)")
    if sources.torch and not sources.keras:
        raise InputError("--train needs --keras (the reference it trains); --torch alone has no Keras optimizer")


def check_request(sources: Sources, training: TrainingChoice | None = None) -> np.ndarray | None:
    """Everything that needs no model: the options, that each named file exists, and the images (for the built-in
    twins, their 3 channels too). Returns the images read from ``sources.images`` (None when none are named)."""
    if training is not None:
        _check_training(sources, training)
    for path, kind in ((sources.keras, "keras"), (sources.torch, "torch")):
        if path:
            check_source(path, kind)
    images = read_images(sources.images) if sources.images else None
    if images is not None and not (sources.keras or sources.torch):
        check_images(images, channels=3)  # the twins take RGB: NCHW images are named as such here
    return images
