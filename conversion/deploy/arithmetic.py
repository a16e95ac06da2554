"""Which precision ONNX Runtime really computed in: read from the graph it optimized, not from the file's types.

ONNX Runtime's CPU provider lacks most float16 kernels: it inserts Casts (``InsertedPrecisionFreeCast_*``) and runs
those nodes in float32 between float16 tensors. A QDQ int8 file computes in int8 only where the optimizer fuses
DequantizeLinear -> Conv -> QuantizeLinear into an integer kernel (QLinearConv and kin); otherwise it runs float32
convolutions on values rounded to the int8 grid. Both show only in the optimized graph
(``SessionOptions.optimized_model_filepath``).
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Any

from conversion.deploy.report import Arithmetic

# The nodes that carry the arithmetic of a ResNet: convolutions and the head's matrix product, in any fused form.
COMPUTE_OPS = {
    "Conv",
    "FusedConv",
    "NhwcFusedConv",
    "QLinearConv",
    "ConvInteger",
    "Gemm",
    "MatMul",
    "FusedMatMul",
    "FusedGemm",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
}
_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 10: "float16", 11: "float64", 16: "bfloat16"}


def _types(model: Any) -> dict[str, int]:
    """The element type of every tensor, propagated from the inputs and constants through the nodes."""
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.elem_type:
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    for node in graph.node:
        attributes = {a.name: a for a in node.attribute}
        known = [types[name] for name in node.input if name in types]
        if node.op_type == "Cast":
            out = attributes["to"].i
        elif node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            zero_point = node.input[2] if len(node.input) > 2 else ""
            out = types.get(zero_point, 2)  # uint8 without a zero point, as the operator defines
        elif node.op_type == "DequantizeLinear":
            out = types.get(node.input[1], 1)  # the scale's type
        elif node.op_type in ("QLinearConv", "QLinearMatMul", "QLinearAdd", "QGemm"):
            # The output's zero point: input 7 (input 8 for QGemm, whose output is float32 without one).
            index = 8 if node.op_type == "QGemm" else 7
            out = types.get(node.input[index], 1) if len(node.input) > index else 1
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            out = 6
        elif node.op_type == "Shape":
            out = 7
        else:
            out = known[0] if known else 1
        for name in node.output:
            types.setdefault(name, out)
    return types


def optimized_graph(path: str | os.PathLike, level: Any = None) -> Any:
    """The graph ONNX Runtime's CPU provider runs for a file (default optimization level: all)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="resnet34-ort-") as work:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its warning that the saved graph is for this machine only: it is read here
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        if level is not None:
            options.graph_optimization_level = level
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def arithmetic_of(path: str | os.PathLike, precision: str) -> Arithmetic:
    """Count the convolutions and matrix products of the optimized graph by the type they compute in."""
    optimized = optimized_graph(path)
    types = _types(optimized)
    compute: collections.Counter[str] = collections.Counter()
    by_type: collections.Counter[str] = collections.Counter()
    for node in optimized.graph.node:
        if node.op_type in COMPUTE_OPS:
            dtype = _NAMES.get(types.get(node.input[0], 1), "other")
            dtype = "int8" if dtype == "uint8" else dtype  # uint8 activations are 8-bit integer arithmetic too
            compute[f"{node.op_type} in {dtype}"] += 1
            by_type[dtype] += 1
    # The runtime names its Casts, and the nodes it fuses them into, InsertedPrecisionFreeCast_*.
    inserted = len(
        {
            name
            for node in optimized.graph.node
            for name in (node.name, *node.output)
            if name.startswith("InsertedPrecisionFreeCast")
        }
    )
    total = sum(by_type.values())
    parts = ", ".join(f"{count} of {total} in {dtype}" for dtype, count in by_type.most_common())
    if precision == "fp16" and not by_type.get("float16"):
        summary = (
            f"float32, not float16: the CPU provider has no float16 kernel for these nodes; it inserted {inserted} "
            f"Casts and computed {parts} between float16 tensors"
        )
    elif precision == "int8" and not by_type.get("int8"):
        summary = f"float32 on int8-rounded values: no integer kernel fused ({parts})"
    else:
        summary = f"convolutions and matrix products: {parts}" + (
            f"; {inserted} Casts inserted by the runtime" if inserted else ""
        )
    return Arithmetic(precision, "all", dict(sorted(compute.items())), inserted, summary)
