"""A deployed ONNX file (fp32, fp16 or int8; ours or anyone's) against its source model, stage by stage and over a
dataset.

Stages: a copy of the file, in memory, gets every stage's boundary tensor (``stage_map``) as an extra graph output;
each is compared with the source's own stage on the same images, and judged against that stage's float32 noise
floor (the Keras model against its float64 twin, doubled as ``verify`` does for ONNX: the floor of a float32 pair).
The stage that adds the largest error of its own (its relative error minus the previous stage's) is where the loss
enters. Dataset: every image through the source and the unmodified file, top-1 compared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from conversion.arrays import cosine_similarity, nchw_to_nhwc
from conversion.deploy.arithmetic import arithmetic_of
from conversion.deploy.lower import check_image_set, input_geometry
from conversion.deploy.report import (
    Accuracy,
    DatasetCheck,
    DeploymentCheck,
    Flip,
    StageError,
    default_max_flip_rate,
)
from conversion.deploy.stage_map import StageMap, check_keep_float, find_stages, name_nodes
from conversion.errors import InputError

# Images per ONNX Runtime and source call over a dataset.
DATASET_BATCH = 64
Logits = Callable[[np.ndarray], np.ndarray]


def load_onnx(path: str | os.PathLike) -> Any:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        return name_nodes(onnx.load(str(path)))
    except Exception as error:  # onnx raises protobuf's DecodeError and others for what is not a model
        raise InputError(f"{path}: not a loadable ONNX file ({str(error).splitlines()[0][:120]})") from None


def stored_precision(model: Any) -> str:
    """fp32, fp16 or int8: the file's own record, else what its tensors hold."""
    recorded = {p.key: p.value for p in model.metadata_props}.get("precision")
    if recorded in ("fp32", "fp16", "int8"):
        return recorded
    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "QLinearConv", "ConvInteger", "DequantizeLinear"}:
        return "int8"
    if any(init.data_type == 10 for init in model.graph.initializer):  # TensorProto.FLOAT16
        return "fp16"
    return "fp32"


def kept_float_of(model: Any) -> tuple[str, ...]:
    recorded = {p.key: p.value for p in model.metadata_props}.get("kept_float", "none")
    return () if recorded == "none" else check_keep_float(recorded.split(","))


def _session(serialized: bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT's own exception types
        raise InputError(f"the ONNX file does not load in ONNX Runtime ({str(error).splitlines()[0][:160]})") from None


# Shape inference needs every initializer's dims and type, and the values of the small ones only (Reshape's shape,
# Pad's pads): the large ones go in as empty tensors, so that ResNet-34's 85 MB of weights are not copied twice.
_INFERENCE_DATA_LIMIT = 4096  # bytes


def _tensor_types(model: Any) -> dict[str, int]:
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)  # a plain copy (~20 ms for 85 MB); what costs is inference over the bytes, not copying
    for tensor in skeleton.graph.initializer:
        if len(tensor.raw_data) > _INFERENCE_DATA_LIMIT:
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # ops shape inference does not know: their types are left to the runtime
        inferred = skeleton
    graph = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.output, *graph.input)}


def float16_tensors(model: Any, types: dict[str, int] | None = None) -> list[str]:
    """Every tensor a node of the file writes in float16."""
    types = _tensor_types(model) if types is None else types
    return [name for node in model.graph.node for name in node.output if types.get(name) == 10]  # FLOAT16


def _with_outputs(model: Any, names: list[str], types: dict[str, int]) -> bytes:
    """The model serialized with ``names`` as extra graph outputs (``types`` from shape inference); ``model`` itself
    is left as it was (the outputs are added for the serialization only: no copy of its weights is made)."""
    import onnx

    existing = {v.name for v in model.graph.output}
    before = len(model.graph.output)
    for name in names:
        if name not in existing:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            existing.add(name)
    try:
        return model.SerializeToString()
    finally:
        del model.graph.output[before:]


def _feed(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    layout = input_geometry(model)[0]
    batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2)) if layout == "NCHW" else images
    return {model.graph.input[0].name: batch.astype(np.float32, copy=False)}


def _nhwc(array: np.ndarray, expected: tuple[int, ...], nchw: bool = True) -> np.ndarray | None:
    """A stage tensor in the source's NHWC layout (ONNX convolutions are NCHW; LiteRT's, ``nchw=False``, are NHWC);
    None where it does not fit."""
    array = np.asarray(array)
    if nchw and array.ndim == 4 and nchw_to_nhwc(array).shape == expected:
        return nchw_to_nhwc(array)
    if array.shape == expected:
        return array
    if array.ndim == 4 and array.size == int(np.prod(expected)) and array.shape[1:3] == (1, 1):
        return array.reshape(expected)
    return None


class DeployedModel:
    """A deployed ONNX file, loaded: its stage map, its plain session, and a probe session exposing the stages."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self.model = load_onnx(path)
        self.stage_map: StageMap = find_stages(self.model, str(self.path))
        self.precision = stored_precision(self.model)
        self.kept_float = kept_float_of(self.model)
        self.layout, self.height, self.width, self.channels = input_geometry(self.model)
        first = self.model.graph.input[0].type.tensor_type.shape.dim[0]
        self.batch = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else None
        self.logits_name = self.stage_map.boundaries["logits"]
        self.tensor_types = _tensor_types(self.model)
        self.session = _session(_with_outputs(self.model, [self.logits_name], self.tensor_types), threads)
        self._probe = None
        self._float16: list[str] = []
        self.overflow: str | None = None  # the first stage holding a non-finite tensor in the probe
        self.threads = threads

    def _run(self, session: Any, names: list[str], images: np.ndarray) -> list[np.ndarray]:
        """``names`` on the images, in chunks of the file's batch where it fixes one (torch.onnx.export without
        dynamic_axes does)."""
        step = self.batch or images.shape[0]
        chunks = [session.run(names, _feed(self.model, images[i : i + step])) for i in range(0, len(images), step)]
        return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(names))]

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The file's logits (the Softmax's input where the file ends in one)."""
        return self._run(self.session, [self.logits_name], images)[0]

    def stages(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage boundary's tensor, as the file computes it (stage -> array in ONNX's layout).

        In a float16 file every float16 tensor is an output of the probe too, so each is stored in float16 as the
        file says (a GPU computing in float16 does so; ONNX Runtime's CPU provider keeps float32 between the nodes
        it fuses, where a float16 overflow would not show): ``self.overflow`` then names the first stage holding a
        non-finite float16 tensor.
        """
        if self._probe is None:
            self._float16 = float16_tensors(self.model, self.tensor_types) if self.precision == "fp16" else []
            names = [*self.stage_map.boundaries.values(), *self._float16]
            self._probe = _session(_with_outputs(self.model, names, self.tensor_types), self.threads)
        stages = list(self.stage_map.boundaries)
        names = [self.stage_map.boundaries[s] for s in stages]
        extra = [name for name in self._float16 if name not in names]
        outputs = self._run(self._probe, names + extra, images)
        producers = {out: node.name for node in self.model.graph.node for out in node.output}
        order = {stage: index for index, stage in enumerate(stages)}
        bad = [
            self.stage_map.nodes.get(producers.get(name, ""), stages[-1])
            for name, value in zip(names + extra, outputs, strict=True)
            if not np.all(np.isfinite(value))
        ]
        self.overflow = min(bad, key=lambda stage: order.get(stage, len(order))) if bad else None
        return dict(zip(stages, outputs[: len(stages)], strict=True))


def check_fits(deployed: DeployedModel, keras_model: Any) -> None:
    """The file's input and head against the source's: one line naming what does not fit."""
    _, height, width, channels = keras_model.input_shape
    if deployed.channels != channels:
        raise InputError(f"{deployed.path} takes {deployed.channels}-channel images; the source takes {channels}")
    for name, mine, theirs in (("height", deployed.height, height), ("width", deployed.width, width)):
        if mine is not None and theirs is not None and mine != theirs:
            raise InputError(f"{deployed.path} takes images of {name} {mine}; the source model takes {theirs}")
    classes = int(keras_model.outputs[0].shape[-1])
    probe = np.zeros((1, deployed.height or height or 32, deployed.width or width or 32, channels), np.float32)
    got = deployed.logits(probe).shape[-1]
    if got != classes:
        raise InputError(f"{deployed.path} has {got} classes; the source model has {classes}")


# The last floor twins built, by the weights' sha256: a search or a test suite checks one source many times (each is
# a float64 copy of the model, ~170 MB for ResNet-34, so only a few are kept).
_FLOOR_TWINS: dict[str, Any] = {}
FLOOR_TWINS_KEPT = 3


def _floor_twin(keras_model: Any) -> Any:
    from conversion.onnx_export import weights_sha256
    from conversion.verify.noise_floor import keras_floor_twin

    key = weights_sha256(keras_model)
    if key not in _FLOOR_TWINS:
        if len(_FLOOR_TWINS) >= FLOOR_TWINS_KEPT:
            _FLOOR_TWINS.pop(next(iter(_FLOOR_TWINS)))
        _FLOOR_TWINS[key] = keras_floor_twin(keras_model)
    return _FLOOR_TWINS[key]


def _source_stages(keras_model: Any, images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The source's stages on the images in float32 and in its float64 floor twin (cumulative)."""
    from conversion.verify.stages import keras_stages

    outputs, floors = {}, {}
    x, x64 = images, images.astype(np.float64)
    floor_stages = dict(keras_stages(_floor_twin(keras_model)))
    for name, run in keras_stages(keras_model):
        x, x64 = run(x), floor_stages[name](x64)
        outputs[name], floors[name] = x, x64
    return outputs, floors


def stage_errors(
    deployed: DeployedModel, keras_model: Any, images: np.ndarray
) -> tuple[tuple[StageError, ...], str | None, str | None]:
    """Per-stage rows, the stage the loss enters at, and the first stage holding inf/NaN."""
    from conversion.verify.noise_floor import floor_multiple, ratio, scale_of, scaled_distance

    multiple = floor_multiple("float32")
    reference, floor_outputs = _source_stages(keras_model, images)
    got = deployed.stages(images)
    rows, previous, inf_first = [], 0.0, None
    for name in deployed.stage_map.stages:
        if name not in reference:
            continue
        expected = reference[name]
        mine = _nhwc(got[name], expected.shape, getattr(deployed, "layout_nchw", True))
        if mine is None:
            raise InputError(
                f"{deployed.path}: stage {name} has shape {tuple(np.shape(got[name]))}; the source's is "
                f"{expected.shape} (NHWC): the graph does not fit the source model"
            )
        mine = mine.astype(np.float64)
        finite = bool(np.all(np.isfinite(mine)))
        if not finite and inf_first is None:
            inf_first = name
        scale = scale_of(expected)
        error = scaled_distance(mine, expected, scale)
        # The float32 floor of a pair, as verify judges ONNX without a torch twin: twice the Keras model's own.
        noise_floor = 2 * scaled_distance(expected, floor_outputs[name], scale)
        abs_error = float(np.abs(mine - expected).max()) if finite else float("inf")
        rows.append(
            StageError(
                name,
                tuple(expected.shape),
                abs_error,
                error,
                noise_floor,
                ratio(error, noise_floor),
                error - previous if np.isfinite(error) else float("inf"),
                cosine_similarity(mine, expected),
                finite,
            )
        )
        previous = error if np.isfinite(error) else previous
    beyond = [row for row in rows if row.floor_ratio > multiple and row.max_rel > 1e-5]
    if deployed.overflow is not None:
        inf_first = min(inf_first or deployed.overflow, deployed.overflow, key=deployed.stage_map.stages.index)
    if inf_first is not None:
        loss = inf_first
    elif beyond:
        loss = max(beyond, key=lambda row: row.added).stage
    else:
        loss = None
    return tuple(rows), loss, inf_first


def keras_logits(keras_model: Any) -> Logits:
    """The Keras model's logits (its head without the activation), stage after stage."""
    from conversion.verify.stages import keras_stages

    stages = [run for name, run in keras_stages(keras_model) if name != "output"]

    def run(images: np.ndarray) -> np.ndarray:
        for stage in stages:
            images = stage(images)
        return images

    return run


def torch_logits(torch_model: Any) -> Logits:
    """A torch ResNet34's logits on NHWC images."""
    from conversion.verify.stages import torch_stages

    names = ["stem", *(f"unit_{i}" for i in range(16)), "pooled", "logits"]
    stages = [run for _, run in torch_stages(torch_model, names)]

    def run(images: np.ndarray) -> np.ndarray:
        for stage in stages:
            images = stage(images)
        return images

    return run


def check_labels(labels: object, count: int) -> np.ndarray:
    """Integer class labels, one per image; else a one-line InputError."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != count:
        raise InputError(f"expected one label per image ({count}); received labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"expected integer class labels; received {labels.dtype}")
    return labels


def dataset_check(
    source: Logits | None,
    deployed: DeployedModel,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch: int = DATASET_BATCH,
    progress: Callable[[int, int], None] | None = None,
    source_logits: np.ndarray | None = None,
) -> DatasetCheck:
    """Every image through both: flips (with the source's margin), accuracy with labels, logit error stats.
    ``source_logits`` (the source's logits on every image, computed once) stands in for ``source``."""
    if labels is not None:
        labels = check_labels(labels, images.shape[0])
    ours, theirs = [], []
    for start in range(0, images.shape[0], batch):
        chunk = images[start : start + batch]
        if source_logits is None:
            ours.append(np.asarray(source(chunk), np.float64))
        theirs.append(np.asarray(deployed.logits(chunk), np.float64))
        if progress:
            progress(min(start + batch, images.shape[0]), images.shape[0])
    src = np.asarray(source_logits, np.float64) if source_logits is not None else np.concatenate(ours)
    dep = np.concatenate(theirs)
    src_top, dep_top = src.argmax(1), np.where(np.isfinite(dep).all(1), np.nan_to_num(dep).argmax(1), -1)
    ordered = np.sort(src, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    flips = tuple(
        Flip(int(i), int(src_top[i]), int(dep_top[i]), float(margin[i])) for i in np.flatnonzero(src_top != dep_top)
    )
    scale = np.abs(src).max(1)
    scale[scale == 0] = 1.0
    per_image = np.abs(dep - src).max(1) / scale
    per_image[~np.isfinite(per_image)] = np.inf
    errors = {
        "max": float(per_image.max()),
        "mean": float(per_image.mean()),
        "p99": float(np.percentile(per_image, 99)),
    }
    accuracy = None
    if labels is not None:
        accuracy = Accuracy(float((src_top == labels).mean()), float((dep_top == labels).mean()), int(labels.shape[0]))
    return DatasetCheck(int(images.shape[0]), flips, accuracy, errors)


def check_deployment(
    keras_model: Any,
    onnx_path: str | os.PathLike,
    stage_images: np.ndarray,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    source: Logits | None = None,
    max_flip_rate: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DeploymentCheck:
    """Check an ONNX file against its source model.

    Args:
        keras_model: the source in ``build_resnet34``'s layout (``verify`` rebuilds any file so), float32.
        onnx_path: the deployed file: fp32, fp16 or int8, from this project or elsewhere.
        stage_images: NHWC float32 images for the per-stage rows (a few: the float64 floor twin runs on them).
        images, labels: the dataset (default: the stage images), and its integer labels.
        source: the source's logits on NHWC images (default: the Keras model's; ``torch_logits`` for a torch file).
        max_flip_rate: the flip rate allowed (default: 0 for a fp32 file, 0.005 for fp16 and int8).
    """
    deployed = DeployedModel(onnx_path)
    check_fits(deployed, keras_model)
    stage_images = check_image_set(stage_images, deployed.model, "images", 1)
    images = stage_images if images is None else check_image_set(images, deployed.model, "images", 1)
    rows, loss, inf_first = stage_errors(deployed, keras_model, stage_images)
    probe_logits = deployed.stages(stage_images)["logits"]
    plain = deployed.logits(stage_images)
    from conversion.arrays import max_rel_err

    drift = max_rel_err(probe_logits, plain) if np.all(np.isfinite(plain)) else None
    dataset = dataset_check(source or keras_logits(keras_model), deployed, images, labels, progress=progress)
    if max_flip_rate is None:
        max_flip_rate = default_max_flip_rate(deployed.precision)
    return DeploymentCheck(
        file=str(onnx_path),
        runtime="onnxruntime",
        precision=deployed.precision,
        kept_float=deployed.kept_float,
        arithmetic=arithmetic_of(onnx_path, deployed.precision),
        stage_images=int(stage_images.shape[0]),
        stages_exposed=tuple(deployed.stage_map.stages),
        loss_enters_at=loss,
        inf_first_at=inf_first,
        probe_drift=drift,
        dataset=dataset,
        max_flip_rate=max_flip_rate,
        stages=rows,
    )


def metadata_of(path: str | os.PathLike) -> dict[str, Any]:
    """The deployment metadata of a file: precision, kept_float, calibration (JSON decoded) and the stage map."""
    model = load_onnx(path)
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("calibration", "stage_map", "keep_float_search"):
        if props.get(key, "none") != "none":
            props[key] = json.loads(props[key])
    return props
