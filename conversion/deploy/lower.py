"""Lower a float32 ResNet-34 ONNX file to the precision it is deployed in: fp16 or int8, with chosen stages of the
source model kept in float32.

- fp16: onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)`` (float32 in and out), the kept
  stages' nodes in its ``node_block_list``; Cast pairs that cancel are then removed (back-to-back Casts gave wrong
  outputs, onnxconverter-common#271).
- int8: ``quant_pre_process`` (shape inference, BatchNorm folding), then ``quantize_static`` in the QDQ format with
  per-channel int8 weights and uint8 activations (QOperator or per-tensor weights wrecked a ResNet's accuracy:
  onnxruntime-inference-examples#319), the kept stages' nodes in ``nodes_to_exclude``.

The stages are found from the graph's structure (``stage_map``); the file's ``metadata_props`` record the stage map,
the precision, the calibration (image count, sha256, method) and the stages kept in float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conversion.arrays import array_sha256
from conversion.deploy.stage_map import (
    METADATA_KEY,
    check_keep_float,
    find_stages,
    keep_float_text,
    name_nodes,
    stage_map_metadata,
)
from conversion.errors import ExportError, InputError

PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Images each method needs at least. MinMax takes the extremes of whatever it sees; the histogram methods choose a
# threshold from the shape of each activation's histogram, and this project asks for two calibration batches of
# CALIBRATION_BATCH (a policy of ours, not a limit of ONNX Runtime's).
CALIBRATION_BATCH = 8
MIN_CALIBRATION_IMAGES = {"minmax": 1, "entropy": 2 * CALIBRATION_BATCH, "percentile": 2 * CALIBRATION_BATCH}


@dataclass(frozen=True)
class Calibration:
    """What int8 was calibrated on: recorded in the file's metadata."""

    images: int
    sha256: str  # of the calibration array's dtype, shape and bytes
    method: str

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "sha256": self.sha256, "method": self.method}


@dataclass(frozen=True)
class Lowered:
    """A written deployment file: where, in which precision, what stayed float32 and how it was calibrated."""

    path: Path
    precision: str
    kept_float: tuple[str, ...]
    calibration: Calibration | None


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}; received {precision!r}")
    return precision


def input_geometry(model: Any) -> tuple[str, int | None, int | None, int]:
    """(layout, height, width, channels) of a ResNet-34 file's input (from its metadata, else its shape)."""
    (spec,) = [value for value in model.graph.input if value.name not in {i.name for i in model.graph.initializer}]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in spec.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise InputError(f"the ONNX file's input {spec.name!r} has rank {len(dims)}; expected images of rank 4")
    layout = {p.key: p.value for p in model.metadata_props}.get("input_layout")
    if layout not in ("NHWC", "NCHW"):  # files from elsewhere: NCHW where a small channel axis sits at axis 1
        layout = "NCHW" if dims[1] is not None and dims[1] <= 4 and not (dims[3] and dims[3] <= 4) else "NHWC"
    if layout == "NCHW":
        return layout, dims[2], dims[3], dims[1] or 3
    return layout, dims[1], dims[2], dims[3] or 3


def check_image_set(
    images: object, model: Any, what: str = "calibration images", minimum: int = 1, method: str | None = None
) -> np.ndarray:
    """NHWC float32 images that fit the file's input, finite, at least ``minimum`` of them; else one-line InputError."""
    _, height, width, channels = input_geometry(model)
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise InputError(f"expected {what} of rank 4 (N, H, W, {channels}); received shape {np.shape(images)}")
    if images.dtype != np.float32:
        raise InputError(f"expected {what} of dtype float32 (NHWC); received {images.dtype}")
    expected = (height or images.shape[1], width or images.shape[2], channels)
    if images.shape[1:] != expected:
        raise InputError(f"expected {what} of shape (N, {', '.join(map(str, expected))}); received {images.shape}")
    if not np.all(np.isfinite(images)):
        raise InputError(f"expected finite {what}; received {int((~np.isfinite(images)).sum())} NaN/Inf values")
    if images.shape[0] < minimum:
        needs = f"calibration method {method} needs" if method else "expected"
        raise InputError(f"{needs} at least {minimum} {what}; received {images.shape[0]}")
    return images


def load_images(path: str | os.PathLike, what: str = "images") -> np.ndarray:
    """An .npy array, never unpickled; the checks against the model come after."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable .npy array of {what} ({str(error).splitlines()[0]})") from None


def _feed(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    layout = input_geometry(model)[0]
    batch = np.ascontiguousarray(images.transpose(0, 3, 1, 2)) if layout == "NCHW" else images
    return {model.graph.input[0].name: batch}


class _Reader:
    """ORT's CalibrationDataReader over NHWC images, in batches, in the file's layout."""

    def __init__(self, model: Any, images: np.ndarray) -> None:
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        step = first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else CALIBRATION_BATCH
        self._batches = iter([_feed(model, images[i : i + step]) for i in range(0, len(images), step)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _remove_cancelling_casts(model: Any) -> int:
    """Remove Cast(fp16->fp32) -> Cast(fp32->fp16) pairs (exact: every fp16 value is a float32 one); returns the
    count. Such pairs appear at the borders of blocked nodes; back-to-back Casts gave wrong outputs
    (onnxconverter-common#271)."""
    import onnx

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    def source_type(name: str) -> int | None:
        node = producers.get(name)
        if node is not None and cast_to(node) is not None:
            return cast_to(node)
        for value in (*graph.input, *graph.value_info):
            if value.name == name:
                return value.type.tensor_type.elem_type
        return None

    removed = []
    rename: dict[str, str] = {}
    for node in graph.node:
        if cast_to(node) != fp32 or source_type(node.input[0]) != fp16 or node.output[0] in outputs:
            continue
        readers = consumers.get(node.output[0], [])
        if readers and all(cast_to(r) == fp16 and r.output[0] not in outputs for r in readers):
            removed.append(node)
            for reader in readers:
                removed.append(reader)
                rename[reader.output[0]] = node.input[0]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    for node in removed:
        graph.node.remove(node)
    return len(removed) // 2 if removed else 0


def _to_fp16(model: Any, block: list[str]) -> Any:
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():  # one warning per weight under 1e-7 that it rounds up to 1e-7 (float16's range)
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=block or None)
    _remove_cancelling_casts(converted)
    return converted


def _to_int8(model: Any, images: np.ndarray, method: str, keep_float: Sequence[str], work: Path) -> Any:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared, quantized = work / "fp32.onnx", work / "prepared.onnx", work / "int8.onnx"
    onnx.save_model(model, str(source))
    quant_pre_process(str(source), str(prepared))  # shape inference and BatchNorm folding, as ORT asks
    prepared_model = name_nodes(onnx.load(str(prepared)))
    onnx.save_model(prepared_model, str(prepared))
    exclude = find_stages(prepared_model).nodes_of(keep_float) if keep_float else []
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    reader, cache = _Reader(prepared_model, images), None
    if method == "entropy":
        # quantize_static's Entropy histograms have 128 bins, as many as the quantized bins, so the only threshold it
        # tries is the full range: the scales came out identical to MinMax's on every tensor (measured, ORT 1.32), and
        # it passes no bin count through. Calibrate here with ENTROPY_BINS bins and hand it the ranges as a cache.
        cache = _entropy_ranges(prepared, reader, work)
        reader = None
    quantize_static(
        str(prepared),
        str(quantized),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # uint8 activations, int8 weights (U8S8): with int8 activations ONNX Runtime 1.32's CPU provider fused only 21
        # of the 37 convolutions and matrix products into integer kernels (measured on the optimized graph); U8S8
        # fuses all 37.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude or None,
        calibrate_method=methods[method],
        calibration_cache_path=None if cache is None else str(cache),
    )
    return onnx.load(str(quantized))


# Entropy calibration's histogram bins and the quantized bins it compares (TensorRT's 2048 and 128).
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128


def _entropy_ranges(prepared: Path, reader: _Reader, work: Path) -> Path:
    """Entropy (KL) calibration ranges with ENTROPY_BINS bins, saved as quantize_static's calibration cache."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        prepared,
        list(set(QLinearOpsRegistry) | set(QDQRegistry)),  # what quantize_static calibrates by default
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )
    calibrator.collect_data(reader)
    cache = work / "entropy_ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def lower_onnx(
    source: str | os.PathLike | Any,
    out: str | os.PathLike,
    precision: str,
    *,
    calibration: np.ndarray | None = None,
    method: str = "minmax",
    keep_float: Sequence[str] = (),
    extra_metadata: dict[str, str] | None = None,
) -> Lowered:
    """Write ``out``: the float32 ResNet-34 ``source`` (a path or ModelProto, from any exporter) in ``precision``.

    Args:
        source: a float32 ResNet-34 ONNX file or model.
        out: the ``.onnx`` file to write (atomically; nothing is left there on failure).
        precision: fp32 (metadata only), fp16 or int8.
        calibration: NHWC float32 images for int8, of the file's height and width.
        method: int8 calibration: minmax, entropy or percentile.
        keep_float: source stages (stem, unit_0 ... unit_15, head) left in float32.
        extra_metadata: more ``metadata_props`` entries (the search's result, for example).
    """
    import onnx

    from conversion.files import atomic_output

    check_precision(precision)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: expected an .onnx destination")
    keep_float = check_keep_float(keep_float)
    if method not in CALIBRATION_METHODS:
        raise InputError(f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}; received {method!r}")
    model = (
        onnx.load(str(source))
        if isinstance(source, (str, os.PathLike))
        else onnx.ModelProto.FromString(source.SerializeToString())
    )
    name_nodes(model)
    find_stages(model)  # refuses what is not a ResNet-34 before any work
    record = None
    if precision == "int8":
        if calibration is None:
            raise InputError("--precision int8 needs calibration images (--calibration IMAGES.npy, NHWC float32)")
        calibration = check_image_set(calibration, model, "calibration images", MIN_CALIBRATION_IMAGES[method], method)
        record = Calibration(int(calibration.shape[0]), array_sha256(calibration), method)
    elif calibration is not None:
        raise InputError(f"--calibration applies to --precision int8; received it with {precision}")
    if precision == "fp32" and keep_float:
        raise InputError("--keep-float applies to --precision fp16 or int8; a fp32 file is float32 throughout")
    with tempfile.TemporaryDirectory(prefix="resnet34-deploy-") as work:
        if precision == "fp16":
            model = _to_fp16(model, find_stages(model).nodes_of(keep_float))
        elif precision == "int8":
            # ORT's histogram calibrators print their progress on stdout, where --json writes: sent to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                model = _to_int8(model, calibration, method, keep_float, Path(work))
    name_nodes(model)
    stage_map = find_stages(model, "the lowered file")
    metadata = {p.key: p.value for p in model.metadata_props}
    metadata.update(
        {
            "precision": precision,
            "kept_float": keep_float_text(keep_float),
            "calibration": json.dumps(record.to_json()) if record else "none",
            METADATA_KEY: stage_map_metadata(stage_map),
            **(extra_metadata or {}),
        }
    )
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    with atomic_output(out) as tmp:
        onnx.save_model(model, str(tmp))
    return Lowered(out, precision, keep_float, record)


def export_deployed(
    model: Any,
    out: str | os.PathLike,
    precision: str,
    *,
    calibration: np.ndarray | None = None,
    method: str = "minmax",
    keep_float: Sequence[str] = (),
    nchw: bool = False,
    size: tuple[int, int] | None = None,
    opset: int | None = None,
    status: Callable[[str], None] | None = None,
) -> Lowered:
    """Export a Keras ResNet-34 (or a torch one, through its Keras twin) to ONNX in ``precision`` (see lower_onnx)."""
    from conversion.onnx_export import export_onnx
    from conversion.weights import torch_to_keras

    check_precision(precision)
    keep_float = check_keep_float(keep_float)  # bad options fail before the ~10-25 s export
    if not hasattr(model, "input_shape"):  # a torch model: its Keras twin, same convention
        model = torch_to_keras(model, (None, None, model.in_channels))
    out = Path(out)
    if not out.parent.is_dir():
        raise InputError(f"{out}: the folder {out.parent} does not exist")
    with tempfile.TemporaryDirectory(prefix="resnet34-export-") as work:
        fp32 = Path(work) / "fp32.onnx"
        if status:
            status("exporting float32 through tf2onnx")
        export_onnx(model, fp32, opset=opset, nchw=nchw, size=size)
        if status and precision != "fp32":
            status(f"lowering to {precision}")
        return lower_onnx(fp32, out, precision, calibration=calibration, method=method, keep_float=keep_float)
