"""What the commands compare, from values: files (or, with none, the seeded hostile twins) and images.

``verify_sources`` and ``train_sources`` are ``resnet34-parity verify`` and ``verify --train`` without the command
line: they take a ``Sources`` (and a ``TrainingChoice``), load and check everything, and return the typed report.
Bad input raises a ``UserInputError`` naming what was expected.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from torch import nn

import keras_impl
from conversion import training
from conversion.arrays import check_images, seeded_images
from conversion.errors import ConversionError, InputError
from conversion.files import HEAD_AUTO, load_keras, load_torch
from conversion.hostile import randomize_weights
from conversion.keras_reader import read_keras
from conversion.verify.defaults import (
    DEFAULT_BATCH,
    DEFAULT_SIZE,
    DEFAULT_TRAIN_BATCH,
    DEFAULT_TRAIN_SIZE,
    DEFAULT_WEIGHT_DECAY,
)
from conversion.verify.inference import source_check, verify_models
from conversion.verify.noise_floor import keras_clone
from conversion.verify.report import TrainingReport, VerifyReport
from conversion.verify.requests import Sources, TrainingChoice, check_request, read_images
from conversion.verify.stages import model_dtype
from conversion.verify.training_sides import head_activation
from conversion.verify.training_steps import (
    TrainingOptions,
    default_optimizer,
    optimizer_like,
    verify_training,
)
from conversion.weights import check_same_architecture, keras_to_torch, torch_to_keras


@dataclass
class ModelPair:
    """The Keras reference and what it is compared with."""

    keras_model: keras.Model  # the reference, in build_resnet34's layout
    torch_model: nn.Module
    source: keras.Model | None  # the user's own Keras model, where it is not the reference
    cast: str | None  # what was cast for --dtype


def _cast(pair: ModelPair, dtype: str | None) -> ModelPair:
    """The pair in ``dtype``: a file's weights cast to float64 exactly; narrowing is refused."""
    stored = model_dtype(pair.keras_model)
    if dtype is None or dtype == stored:
        return pair
    if dtype != "float64":
        raise InputError(f"--dtype {dtype}: a file's weights are cast only to float64 (widening is exact)")
    return ModelPair(
        keras_clone(pair.keras_model, dtype),
        copy.deepcopy(pair.torch_model).double(),
        None if pair.source is None else keras_clone(pair.source, dtype),
        f"the files' {stored} weights cast to {dtype} for the comparison",
    )


def _with_head(model: keras.Model | nn.Module, path: str) -> None:
    """verify compares logits: a trunk alone (keras-hub's ResNetBackbone, transformers' ResNetModel) has none."""
    if not (model.num_classes if isinstance(model, nn.Module) else read_keras(model).num_classes):
        raise InputError(
            f"{path}: ResNet-34's trunk alone (no pooling and Dense head); verify compares logits: give the whole "
            "classifier (convert reads the trunk)"
        )


def _twins(sources: Sources, head: str | None) -> ModelPair:
    keras_model = keras_impl.build_resnet34(
        10, (None, None, 3), head, sources.dtype or "float32", initialize_weights=False
    )
    randomize_weights(keras_model, sources.seed)  # every weight
    return ModelPair(keras_model, keras_to_torch(keras_model), None, None)


def _twin_head(sources: Sources) -> str | None:
    """The built-in twins' head: the book's softmax unless one was asked for."""
    return "softmax" if sources.classifier_activation == HEAD_AUTO else sources.classifier_activation


def load_pair(sources: Sources) -> ModelPair:
    """The Keras reference, the torch side, the user's own Keras model (where it is not the reference) and what
    was cast. A Keras file of any origin is rebuilt bit for bit in ``build_resnet34``'s layout, whose layer names
    the per-stage report uses; the twin it was rebuilt from is the torch side unless a torch file is given."""
    if sources.keras:
        source = load_keras(sources.keras, sources.classifier_activation)
        _with_head(source, sources.keras)
        twin = keras_to_torch(source)
        keras_model = torch_to_keras(twin, tuple(source.input_shape[1:]))
        torch_model = twin
        if sources.torch:
            # A .pt does not record its head's activation: the Keras model's is the right default.
            torch_model = load_torch(sources.torch, head_activation(keras_model) or "linear")
            check_same_architecture(keras_model, torch_model)  # one-line error naming the layer and both values
        return _cast(ModelPair(keras_model, torch_model, source, None), sources.dtype)
    if sources.torch:
        torch_model = load_torch(sources.torch, sources.classifier_activation)
        _with_head(torch_model, sources.torch)
        keras_model = torch_to_keras(torch_model, (None, None, torch_model.in_channels))
        return _cast(ModelPair(keras_model, torch_model, None, None), sources.dtype)
    if sources.onnx:
        raise InputError("--onnx needs --keras or --torch: the weights the ONNX file was exported from")
    return _twins(sources, _twin_head(sources))


def _model_images(images: np.ndarray, channels: int, dtype: str, min_size: int = 1) -> np.ndarray:
    images = check_images(images, channels, min_size=min_size)
    if images.dtype != dtype:
        if images.dtype == np.float64:
            raise InputError(f"expected {dtype} images for a {dtype} model; received {images.dtype}")
        images = images.astype(dtype)  # float32 images for a float64 comparison: widening is exact
    return images


def comparison_images(sources: Sources, keras_model: keras.Model, images: np.ndarray | None = None) -> np.ndarray:
    """The images ``verify`` runs: those given (``images``, or read from ``sources.images``), or seeded ones of the
    asked batch and size; checked against the model."""
    dtype = model_dtype(keras_model)
    _, height, width, channels = keras_model.input_shape
    if sources.images or images is not None:
        images = _model_images(read_images(sources.images) if images is None else images, channels, dtype)
    else:
        batch, size = sources.batch or DEFAULT_BATCH, sources.size or DEFAULT_SIZE
        images = seeded_images(batch, *size, channels, seed=sources.seed + 1, dtype=dtype)
    if (height, width) != (None, None) and images.shape[1:3] != (height, width):
        raise InputError(f"the Keras model takes {height}x{width} images; received {images.shape[1]}x{images.shape[2]}")
    return images


def verify_sources(sources: Sources) -> VerifyReport:
    """``resnet34-parity verify``: load and compare, stage by stage, against Keras."""
    given = check_request(sources)
    pair = load_pair(sources)
    if sources.onnx and model_dtype(pair.keras_model) != "float32":
        raise InputError("--onnx compares a float32 ONNX file; run it with --dtype float32")
    images = comparison_images(sources, pair.keras_model, given)
    report = verify_models(pair.keras_model, pair.torch_model, images, onnx_path=sources.onnx, seed=sources.seed)
    report.cast = pair.cast
    if pair.source is not None:
        report.source_check = source_check(pair.source, pair.keras_model, images)
        report.agree = report.agree and report.source_check.ok
    return report


# --- training -------------------------------------------------------------------------------------------


def training_pair(sources: Sources) -> ModelPair:
    """The Keras model that trains as the reference (a file keeps its compiled optimizer and loss), its torch side."""
    if not sources.keras:  # (check_request refused --onnx, and --torch alone)
        return _twins(sources, _twin_head(sources))
    keras_model = load_keras(sources.keras, sources.classifier_activation)
    _with_head(keras_model, sources.keras)
    torch_model = (
        load_torch(sources.torch, head_activation(keras_model) or "linear")
        if sources.torch
        else keras_to_torch(keras_model)
    )
    pair = ModelPair(keras_model, torch_model, None, None)
    cast = _cast(pair, sources.dtype)
    compiled = getattr(keras_model, "optimizer", None)
    if cast is not pair and compiled is not None:  # the file's own optimizer (and its state) and loss, cast too
        cast.keras_model.compile(optimizer=optimizer_like(compiled, cast.keras_model), loss=keras_model.loss)
    return cast


def training_data(
    sources: Sources, keras_model: keras.Model, steps: int, images: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(K, N, H, W, C) images and (K, N) labels, one batch per step; or one batch of ``images`` (or read from
    ``sources.images``), reused."""
    dtype = model_dtype(keras_model)
    classes = int(keras_model.outputs[0].shape[-1])
    _, height, width, channels = keras_model.input_shape
    size = DEFAULT_TRAIN_SIZE if sources.size is None else tuple(sources.size)
    batch = DEFAULT_TRAIN_BATCH if sources.batch is None else sources.batch
    if (height, width) != (None, None):
        size = (height, width)
    rng = np.random.default_rng(sources.seed + 2)
    if sources.images or images is not None:
        images = _model_images(read_images(sources.images) if images is None else images, channels, dtype, 2)
        return images, rng.integers(0, classes, images.shape[0])  # the same batch every step
    images = np.stack(
        [seeded_images(batch, *size, channels, seed=sources.seed + 1 + k, dtype=dtype) for k in range(steps)]
    )
    return images, rng.integers(0, classes, (steps, batch))


@dataclass
class PreparedTraining:
    """Everything ``verify --train`` checked and loaded, ready to train (``run``)."""

    pair: ModelPair
    images: np.ndarray
    labels: np.ndarray
    options: TrainingOptions

    def run(self, progress: Callable[[int], None] | None = None) -> TrainingReport:
        """Train both sides and compare every tensor after every step (``progress`` gets the steps done)."""
        report = verify_training(
            self.pair.keras_model, self.pair.torch_model, self.images, self.labels, self.options, progress=progress
        )
        report.cast = self.pair.cast
        return report


def prepare_training(sources: Sources, choice: TrainingChoice) -> PreparedTraining:
    """Check the options, load the models and the data, and choose the optimizer; bad input raises here."""
    given = check_request(sources, choice)  # bad options, paths and images fail before the models load
    pair = training_pair(sources)
    images, labels = training_data(sources, pair.keras_model, choice.steps, given)
    compiled = getattr(pair.keras_model, "optimizer", None)
    if choice.optimizer is None and compiled is not None and (choice.learning_rate or choice.weight_decay is not None):
        raise InputError(
            "--learning-rate/--weight-decay set up --optimizer; the model's compiled optimizer is used as saved"
        )
    if choice.optimizer or compiled is None:
        decay = DEFAULT_WEIGHT_DECAY if choice.weight_decay is None else choice.weight_decay
        optimizer = default_optimizer(choice.optimizer or "nesterov", choice.learning_rate, decay, choice.steps)
    else:
        optimizer = compiled
    try:
        training.keras_rule(optimizer)  # refuse an untranslatable optimizer before any work
    except ConversionError as error:
        raise ConversionError(f"verify --train: {error}") from None
    options = TrainingOptions(
        steps=choice.steps,
        keras_optimizer=optimizer,
        keras_loss=getattr(pair.keras_model, "loss", None),
        seed=sources.seed,
    )
    return PreparedTraining(pair, images, labels, options)


def train_sources(
    sources: Sources, choice: TrainingChoice, progress: Callable[[int], None] | None = None
) -> TrainingReport:
    """``resnet34-parity verify --train``: train both sides and compare every tensor after every step."""
    return prepare_training(sources, choice).run(progress)
