"""ONNX export of the twins (Keras through tf2onnx, torch through torch.onnx) and a numpy-only runner.

The Keras path traces a ``tf.function`` with an explicit ``tf.TensorSpec([None, H, W, C], name="images")``
and converts it with ``tf2onnx.convert.from_function``. ``tf2onnx.convert.from_keras`` is not used: it
fails on Keras 3 models (KeyError 'keras_tensor_…', no ``output_names``; docs/pitfalls.md), and Keras's own
``model.export(format="onnx")`` runs the same ``from_function`` route but refuses a model that has never
been called and names the input ``keras_tensor`` and the batch ``unk__NNN``. Tracing ourselves gives the
names, the layout and the metadata we want, for any built model.

TensorFlow, Keras, tf2onnx and torch are imported inside the functions: this module's own imports are
numpy and the project's light modules, so ``run_onnx`` serves consumers that only run files.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from conversion.arrays import check_images, hash_array, nhwc_to_nchw
from conversion.errors import ExportError, InputError

if TYPE_CHECKING:  # the module keeps its imports light: run_onnx serves consumers without TensorFlow
    from conversion.keras_reader import KerasResNet

# tf2onnx's preferred opset (its `PREFERRED_OPSET`), used for both exports so the files compare op for op.
DEFAULT_OPSET = 15
# Opsets whose full-model export was checked here (checker, <= 1 Transpose, no Pad or BatchNormalization).
# tf2onnx 1.17 writes at most opset 18, and at 18 its transpose optimizer cannot push the layout
# Transpose through ReduceMean(keepdims=0) (axes became an input), leaving a second Transpose.
KERAS_OPSETS = range(13, 18)
# torch 2.14's TorchScript exporter goes up to opset 20 (torch.onnx._constants).
TORCH_OPSETS = range(13, 21)

# Head activation -> name of the graph output.
_OUTPUT_NAMES = {"linear": "logits", "softmax": "probabilities", "sigmoid": "probabilities"}


def output_name(classifier_activation: str | None) -> str:
    """The graph output's name for a head activation: logits, probabilities, or outputs."""
    return _OUTPUT_NAMES.get(classifier_activation or "linear", "outputs")


def weights_sha256(model: Any) -> str:
    """sha256 of a Keras model's or torch module's floating weights (order, dtype, shape and bytes).

    Names are left out on purpose: Keras auto-names unnamed sublayers (the book's units: ``conv2d_17``) from a
    per-process counter, so the same weights would hash differently in two processes. The hash is over the source
    framework's own layout, so a Keras model and its torch twin do not share it.
    """
    if hasattr(model, "state_dict"):  # torch: parameters and BatchNorm buffers, not num_batches_tracked
        arrays = [t.detach().cpu().numpy() for t in model.state_dict().values() if t.is_floating_point()]
    else:
        import keras

        arrays = [keras.ops.convert_to_numpy(v) for v in model.weights]
    digest = hashlib.sha256()
    for index, array in enumerate(arrays):
        hash_array(digest, array, label=f"{index}:")
    return digest.hexdigest()


def _check_opset(opset: int | None, supported: range, exporter: str) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool) or opset not in supported:
        raise ExportError(
            f"unsupported ONNX opset for the {exporter} export; expected {supported.start} to {supported.stop - 1}. "
            f"Received: opset={opset!r}"
        )
    return opset


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: expected an .onnx destination")
    return path


def _input_size(model_hw: tuple, size: tuple[int, int] | None) -> tuple[int, int]:
    """Height and width of the exported input: the model's own, else ``size`` (they must agree)."""
    if size is not None:
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ExportError(f"size must be two positive integers (height, width). Received: size={size!r}")
        if any(m is not None and m != s for m, s in zip(model_hw, size, strict=True)):
            raise ExportError(f"size={tuple(size)} contradicts the model's input size {tuple(model_hw)}")
        return int(size[0]), int(size[1])
    if None in model_hw:
        # Fixed H/W keep TF "same" padding static, so it lands in Conv/MaxPool `pads` (no Pad nodes).
        raise ExportError(
            f"the model's input height and width are {tuple(model_hw)}; the ONNX export needs them fixed: "
            "give the size (--size H W on the command line, size=(H, W) from Python) or build the model with a fixed "
            "input_shape"
        )
    return int(model_hw[0]), int(model_hw[1])


def _finish(proto: Any, metadata: dict[str, str], tmp: Path) -> None:
    """Name the batch dimension, add metadata, check the model fully, and write it to ``tmp``."""
    import onnx

    graph = proto.graph
    # tf2onnx names the batch `unk__NNN`, one name per tensor; every one of them is the same batch.
    batch_names = {value.type.tensor_type.shape.dim[0].dim_param for value in (*graph.input, *graph.output)} - {""}
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in batch_names:
                dim.dim_param = "batch"
    graph.name = "resnet34"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:  # a converter bug, not a user error: keep the trace
        raise RuntimeError(f"the exported graph fails onnx.checker: {str(error).splitlines()[0]}") from error
    onnx.save_model(proto, str(tmp))


def _check_keras_resnet34(model: Any) -> KerasResNet:
    import keras

    from conversion.errors import ConversionError
    from conversion.keras_reader import read_keras

    if not isinstance(model, keras.Model):
        raise ExportError(f"expected a Keras ResNet-34 model. Received: {type(model).__name__}")
    try:
        resnet = read_keras(model)
    except ConversionError as error:
        raise ExportError(str(error)) from None
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"the tf2onnx export needs Keras's TensorFlow backend; the backend is {keras.backend.backend()}"
        )
    dtypes = {keras.backend.standardize_dtype(v.dtype) for v in model.weights} | {model.compute_dtype}
    if dtypes != {"float32"}:
        # ONNX Runtime's CPU Conv is float32-only (no double kernel), and mixed policies compute in 16 bits.
        raise ExportError(f"expected a float32 model; received weights/compute dtypes {sorted(dtypes)}")
    return resnet


@contextlib.contextmanager
def _tf2onnx_optimizers(guarded: bool) -> Iterator[None]:
    """tf2onnx's own switch (TF2ONNX_CATCH_ERRORS): guarded, it deep-copies the whole graph, weights included,
    before each of its optimizers, to roll back one that fails. The copies were 1.5 s of an 8.3 s export here
    (64x48), the file is the same byte for byte, and no optimizer fails on this network; a user's own setting
    is left alone."""
    if "TF2ONNX_CATCH_ERRORS" in os.environ:
        yield
        return
    os.environ["TF2ONNX_CATCH_ERRORS"] = "TRUE" if guarded else "FALSE"
    try:
        yield
    finally:
        del os.environ["TF2ONNX_CATCH_ERRORS"]


@contextlib.contextmanager
def _protos_written_once() -> Iterator[None]:
    """tf2onnx rewrites every node's protobuf after each of its optimizers, copying each weight tensor into it
    (~15 full copies of the weights per export), though nothing reads those protobufs until the graph is written,
    and writing it rewrites them all once more. Inside, the optimizers' rewrites are skipped: the same file byte for
    byte, written ~25% faster (64x48 here: 5.0-5.7 s -> 3.6-4.3 s)."""
    from tf2onnx.graph import Graph
    from tf2onnx.optimizer.optimizer_base import GraphOptimizerBase

    write, optimize = Graph.update_proto, GraphOptimizerBase.optimize
    in_optimizer = threading.local()

    def update_proto(self: Any, external_tensor_storage: Any = None) -> None:
        if not getattr(in_optimizer, "active", False):
            write(self, external_tensor_storage)

    def optimize_lazily(self: Any, graph: Any, iteration: int) -> Any:
        in_optimizer.active = True
        try:
            return optimize(self, graph, iteration)
        finally:
            in_optimizer.active = False

    Graph.update_proto, GraphOptimizerBase.optimize = update_proto, optimize_lazily
    try:
        yield
    finally:
        Graph.update_proto, GraphOptimizerBase.optimize = write, optimize


def export_onnx(
    keras_model: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    nchw: bool = False,
    size: tuple[int, int] | None = None,
) -> Path:
    """Export a Keras ResNet-34 to ONNX via tf2onnx: input ``images`` (dynamic batch), atomic write.

    Args:
        keras_model: a float32 model from ``keras_impl.build_resnet34`` (called or not).
        path: the ``.onnx`` file to write; nothing is left there on failure.
        opset: ONNX opset, 13 to 17 (default 15).
        nchw: take (N, C, H, W) input like the torch twin; tf2onnx then drops the layout Transpose.
        size: (height, width) for a model built with ``None`` height/width; must match a fixed one.
    """
    path = _check_path(path)
    resnet = _check_keras_resnet34(keras_model)
    _, *model_hw, channels = keras_model.input_shape
    height, width = _input_size(tuple(model_hw), size)
    opset = _check_opset(opset, KERAS_OPSETS, "Keras (tf2onnx)")
    try:
        import tf2onnx
    except ImportError as error:
        raise ExportError(f"tf2onnx is missing ({error}); install it: python3 -m pip install tf2onnx") from None
    import keras
    import tensorflow as tf

    from conversion.files import atomic_output

    name = output_name(resnet.head_activation)
    spec = tf.TensorSpec([None, height, width, channels], tf.float32, name="images")

    @tf.function(input_signature=[spec], autograph=False)
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {name: keras_model(images, training=False)}  # a dict key names the ONNX output

    layout = "NCHW" if nchw else "NHWC"
    shape = (channels, height, width) if nchw else (height, width, channels)
    metadata = {
        "architecture": "ResNet-34",
        "convention": resnet.convention,
        "source_framework": "keras",
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "converter": f"tf2onnx {tf2onnx.__version__} (from_function)",
        "opset": str(opset),
        "input_layout": layout,
        "input_shape": ",".join(map(str, ("batch", *shape))),
        "output": name,
        "weights_sha256": weights_sha256(keras_model),
        "python_version": platform.python_version(),
    }
    try:
        with atomic_output(path) as tmp:

            def convert() -> Any:
                return tf2onnx.convert.from_function(
                    serve,
                    input_signature=[spec],
                    opset=opset,
                    # tf2onnx puts an NCHW->NHWC Transpose after the input; its optimizer cancels it against
                    # the NHWC->NCHW one before the first Conv, so the NCHW graph has no Transpose at all.
                    inputs_as_nchw=["images"] if nchw else None,
                )[0]

            try:
                with _tf2onnx_optimizers(guarded=False), _protos_written_once():
                    proto = convert()
            except Exception:  # an optimizer failed: tf2onnx's guarded run skips it, as it does by default
                with _tf2onnx_optimizers(guarded=True):
                    proto = convert()
            _finish(proto, metadata, tmp)
            del proto
    finally:
        # tf2onnx's graph objects sit in reference cycles holding ~3 GB for this model (measured: RSS
        # 6.8 GB after an export, 3.7 GB after a collection); free them before the caller carries on.
        gc.collect()
    return path


def export_torch_onnx(
    torch_model: Any, path: str | os.PathLike, *, size: tuple[int, int] = (224, 224), opset: int | None = None
) -> Path:
    """Export the torch twin to ONNX (NCHW input ``images``, dynamic batch, fixed H/W), atomic write.

    torch 2.14's default ``torch.onnx.export(dynamo=True)`` needs onnxscript; the TorchScript exporter
    (``dynamo=False``, deprecated but complete) needs nothing more, folds BatchNorm in eval mode and names
    the batch axis through ``dynamic_axes``. ``pad_same`` reads H/W at run time, so the graph keeps small
    Pad/Shape chains for the strided layers; they compute the TF padding exactly for the exported size.
    """
    import torch

    import torch_impl
    from conversion.files import atomic_output

    path = _check_path(path)
    if not isinstance(torch_model, torch_impl.ResNet34):
        raise ExportError(f"expected a torch_impl.ResNet34. Received: {type(torch_model).__name__}")
    dtypes = {str(t.dtype) for t in torch_model.state_dict().values() if t.is_floating_point()}
    if dtypes != {"torch.float32"}:
        raise ExportError(f"expected a float32 model; received weights of dtypes {sorted(dtypes)}")
    height, width = _input_size((None, None), size)
    opset = _check_opset(opset, TORCH_OPSETS, "torch")
    name = output_name(torch_model.classifier_activation)
    device = next(torch_model.parameters()).device
    example = torch.zeros(1, torch_model.in_channels, height, width, device=device)
    metadata = {
        "architecture": "ResNet-34 (torch_impl.ResNet34)",
        "source_framework": "torch",
        "torch_version": torch.__version__,
        "converter": "torch.onnx.export (TorchScript, dynamo=False)",
        "opset": str(opset),
        "input_layout": "NCHW",
        "input_shape": ",".join(map(str, ("batch", torch_model.in_channels, height, width))),
        "output": name,
        "weights_sha256": weights_sha256(torch_model),
        "python_version": platform.python_version(),
    }
    import onnx

    with atomic_output(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and its constant-folding notes on Slice.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch_model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=[name],
            dynamic_axes={"images": {0: "batch"}, name: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        _finish(onnx.load(str(tmp)), metadata, tmp)
    return path


def _session(path_or_session: Any) -> Any:
    import onnxruntime as ort

    if isinstance(path_or_session, ort.InferenceSession):
        return path_or_session
    path = Path(path_or_session)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types for unreadable or invalid files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a loadable ONNX file ({reason[:160]})") from None


def input_layout(path_or_session: Any) -> str:
    """'NHWC' or 'NCHW': from the file's metadata, else guessed from a static channel axis of 1 to 4."""
    session = _session(path_or_session)
    layout = session.get_modelmeta().custom_metadata_map.get("input_layout")
    if layout in ("NHWC", "NCHW"):
        return layout
    shape = session.get_inputs()[0].shape  # files from elsewhere: (N, H, W, C) unless C sits at axis 1
    small = [isinstance(d, int) and d <= 4 for d in shape]
    if len(shape) == 4 and small[1] and not small[3]:
        return "NCHW"
    return "NHWC"


def run_onnx(path_or_session: Any, images_nhwc: np.ndarray) -> np.ndarray:
    """Run an ONNX file (or a session, to reuse one) on NHWC images, transposed for an NCHW file; its first output."""
    session = _session(path_or_session)
    layout = input_layout(session)
    (spec,) = session.get_inputs()
    shape = list(spec.shape)
    if layout == "NCHW":
        shape = [shape[0], *shape[2:], shape[1]]  # the NHWC view of the file's input
    channels = shape[3] if isinstance(shape[3], int) else images_nhwc.shape[-1]
    images = check_images(images_nhwc, channels=channels)
    for axis, name in ((1, "height"), (2, "width")):
        if isinstance(shape[axis], int) and images.shape[axis] != shape[axis]:
            raise InputError(f"the ONNX file takes images of {name} {shape[axis]}; received NHWC shape {images.shape}")
    dtype = np.float64 if spec.type == "tensor(double)" else np.float32
    images = images.astype(dtype, copy=False)
    if layout == "NCHW":
        images = nhwc_to_nchw(images)
    return session.run(None, {spec.name: images})[0]
