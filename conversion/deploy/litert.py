"""LiteRT, Keras's own way to deploy: ``model.export(path, format="litert")`` (Keras 3.13+ with ``ai-edge-litert``),
fp32 and int8 (full-integer kernels calibrated on a representative dataset), checked through the same dataset report
as an ONNX file.

The stages are found by structure, as in an ONNX graph (the max-pool, the 16 residual ADDs, the MEAN, the output), in
an interpreter that keeps every tensor; int8 tensors are dequantized with their own scale and zero point.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from conversion.arrays import array_sha256
from conversion.deploy.report import Arithmetic, DeploymentCheck, default_max_flip_rate
from conversion.errors import InputError

LITERT_PRECISIONS = ("fp32", "int8")


def export_litert(
    keras_model: Any, path: str | os.PathLike, precision: str = "fp32", calibration: np.ndarray | None = None
) -> Path:
    """Write ``path`` (.tflite) through ``keras_model.export(format="litert")``; int8 calibrates on ``calibration``."""
    import tensorflow as tf

    from conversion.files import atomic_output

    path = Path(path)
    if path.suffix != ".tflite":
        raise InputError(f"{path}: expected a .tflite destination")
    if precision not in LITERT_PRECISIONS:
        raise InputError(f"LiteRT precision must be one of {', '.join(LITERT_PRECISIONS)}; received {precision!r}")
    options: dict[str, Any] = {}
    if precision == "int8":
        if calibration is None or calibration.ndim != 4 or calibration.dtype != np.float32:
            raise InputError("LiteRT int8 needs calibration images: NHWC float32")

        def representative() -> Any:
            for image in calibration:
                yield [image[None]]

        options = {"optimizations": [tf.lite.Optimize.DEFAULT], "representative_dataset": representative}
    try:
        import ai_edge_litert  # noqa: F401  (Keras's LiteRT export needs it, and says so only in a traceback)
    except ImportError:
        raise InputError("a .tflite export needs LiteRT: pip install ai-edge-litert") from None
    with atomic_output(path) as tmp:
        keras_model.export(str(tmp), format="litert", verbose=False, **options)
    return path


class LiteRTModel:
    """A .tflite file in LiteRT's interpreter, one image at a time (its input is fixed at batch 1)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interpreter = Interpreter(str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def logits(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        for image in images:
            self.interpreter.set_tensor(self.input["index"], image[None].astype(self.input["dtype"], copy=False))
            self.interpreter.invoke()
            outputs.append(np.array(self.interpreter.get_tensor(self.output["index"])[0]))
        return np.stack(outputs)

    # The stages by structure, as for ONNX: the max-pool's output (stem), the 16 additions' (units; LiteRT fuses the
    # ReLU into the ADD), the mean (pooled), the graph's output (logits).
    layout_nchw = False
    overflow = None

    @property
    def stage_map(self) -> Any:
        """What ``check.stage_errors`` reads of a stage map: the stages in forward order."""
        import types

        from conversion.deploy.stage_map import STAGES

        return types.SimpleNamespace(stages=[stage for stage in STAGES if stage != "output"])

    def _probe(self) -> tuple[Any, dict[str, int]]:
        """An interpreter that keeps every tensor (without the XNNPACK delegate, whose tensors are not kept), and the
        index of each stage's tensor."""
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if getattr(self, "_probe_cache", None) is None:
            probe = Interpreter(
                str(self.path),
                experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            probe.allocate_tensors()
            ops = probe._get_ops_details()
            pools = [op["outputs"][0] for op in ops if op["op_name"] == "MAX_POOL_2D"]
            adds = [op["outputs"][0] for op in ops if op["op_name"] == "ADD"]
            means = [op["outputs"][0] for op in ops if op["op_name"] == "MEAN"]
            if (len(pools), len(adds), len(means)) != (1, 16, 1):
                raise InputError(
                    f"{self.path}: expected one max-pool, 16 residual additions and one mean in the LiteRT graph; "
                    f"found {len(pools)}, {len(adds)} and {len(means)}"
                )
            indices = {"stem": pools[0], **{f"unit_{i}": t for i, t in enumerate(adds)}, "pooled": means[0]}
            indices["logits"] = probe.get_output_details()[0]["index"]
            self._probe_cache = (probe, indices)
        return self._probe_cache

    def stages(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage's tensor (NHWC, dequantized where int8), one image at a time."""
        probe, indices = self._probe()
        details = {t["index"]: t for t in probe.get_tensor_details()}
        collected: dict[str, list[np.ndarray]] = {stage: [] for stage in indices}
        for image in images:
            probe.set_tensor(self.input["index"], image[None].astype(self.input["dtype"], copy=False))
            probe.invoke()
            for stage, index in indices.items():
                value = np.array(probe.get_tensor(index))
                scale, zero_point = details[index]["quantization"]
                if np.issubdtype(value.dtype, np.integer) and scale:
                    value = (value.astype(np.float64) - zero_point) * scale
                collected[stage].append(value[0])
        return {stage: np.stack(values) for stage, values in collected.items()}

    def integer_ops(self) -> dict[str, int]:
        """Convolutions and fully connected ops by the type of their input tensor."""
        counts: dict[str, int] = {}
        details = {t["index"]: t for t in self.interpreter.get_tensor_details()}
        for op in self.interpreter._get_ops_details():  # the only op-level view LiteRT's Python API gives
            if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                dtype = np.dtype(details[op["inputs"][0]]["dtype"]).name
                key = f"{op['op_name']} in {dtype}"
                counts[key] = counts.get(key, 0) + 1
        return counts


def check_litert(
    keras_model: Any,
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    precision: str = "fp32",
    max_flip_rate: float | None = None,
    stage_images: int = 2,
) -> DeploymentCheck:
    """A .tflite file against its Keras source: per-stage rows on the first ``stage_images`` images (from an
    interpreter without the XNNPACK delegate, which keeps no intermediate tensors), then logits over all of them."""
    from conversion.deploy.check import dataset_check, keras_logits, stage_errors

    model = LiteRTModel(path)
    # The per-stage rows on a few images (the float64 floor twin runs on them), then every image.
    rows, loss, inf_first = stage_errors(model, keras_model, images[:stage_images])  # type: ignore[arg-type]
    dataset = dataset_check(keras_logits(keras_model), model, images, labels)  # type: ignore[arg-type]
    compute = model.integer_ops()
    parts = ", ".join(f"{count} {key}" for key, count in sorted(compute.items()))
    if max_flip_rate is None:
        max_flip_rate = default_max_flip_rate(precision)
    return DeploymentCheck(
        file=str(path),
        runtime="litert",
        precision=precision,
        kept_float=(),
        arithmetic=Arithmetic(precision, "litert", compute, 0, f"LiteRT ops: {parts}"),
        stage_images=min(stage_images, len(images)),
        stages_exposed=tuple(row.stage for row in rows),
        loss_enters_at=loss,
        inf_first_at=inf_first,
        probe_drift=None,
        dataset=dataset,
        max_flip_rate=max_flip_rate,
        stages=rows,
    )


def calibration_record(calibration: np.ndarray) -> dict[str, Any]:
    return {"images": int(calibration.shape[0]), "sha256": array_sha256(calibration), "method": "litert"}
