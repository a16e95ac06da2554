"""Which ONNX tensor holds each stage of the source model (stem, unit_0 ... unit_15, pooled, logits), and which
nodes compute it: found from the graph's structure, never from its names.

Every exporter names nodes its own way (tf2onnx ``Conv__172``, torch ``/unit_3/main_layers.0/Conv``, torchvision
``/layer2/layer2.0/conv1/Conv``), and quantization or float16 conversion renames and inserts more. The structure
does not change: ResNet-34 has one max-pool (the stem's), 36 convolutions, 16 residual additions (one per unit,
neither operand a constant) and one matrix product (the head). A stage's **boundary** is the tensor the next stage
consumes: from the max-pool's or a residual addition's output, through the element-wise nodes that only carry the
value on (ReLU, QuantizeLinear/DequantizeLinear, Cast, Identity), to the tensor that more than one node reads. A node
belongs to the first stage whose boundary depends on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conversion.errors import InputError
from conversion.structure import UNIT_COUNT

UNITS = tuple(f"unit_{i}" for i in range(UNIT_COUNT))
# The stages a per-stage report has (the file's output too where a softmax follows the logits).
STAGES = ("stem", *UNITS, "pooled", "logits")
# What --keep-float names: the source model's stem, its 16 units, and its head (pooling, Dense, activation).
KEEP_FLOAT_STAGES = ("stem", *UNITS, "head")
HEAD_STAGES = ("pooled", "logits", "output")
CONV_OPS = {"Conv", "QLinearConv", "ConvInteger", "FusedConv", "NhwcFusedConv"}
ADD_OPS = {"Add", "Sum", "QLinearAdd"}
HEAD_OPS = {"Gemm", "MatMul", "QGemm", "QLinearMatMul", "MatMulInteger"}
POOL_OPS = {"MaxPool", "NhwcMaxPool"}
# Nodes that carry a stage's value on without mixing anything in: a boundary is looked for past them.
CARRY_OPS = {"Relu", "QuantizeLinear", "DequantizeLinear", "Cast", "Identity"}
METADATA_KEY = "stage_map"
CONV_COUNT, ADD_COUNT = 36, UNIT_COUNT


@dataclass(frozen=True)
class StageMap:
    """The boundary tensor of every stage and the stage of every node of one ONNX graph."""

    boundaries: dict[str, str]  # stage -> the tensor holding its output, as the next stage reads it
    nodes: dict[str, str] = field(default_factory=dict)  # node name -> stage
    input: str = "images"  # the graph's input

    @property
    def stages(self) -> list[str]:
        """The stages in forward order (with "output" where a softmax follows the logits)."""
        return list(self.boundaries)

    def previous(self, stage: str) -> str:
        """The tensor a stage reads: the previous stage's boundary, or the graph's input for the stem."""
        index = self.stages.index(stage)
        return self.input if index == 0 else self.boundaries[self.stages[index - 1]]

    def nodes_of(self, keep_float: Iterable[str]) -> list[str]:
        """The names of the nodes that compute the given --keep-float stages (stem, unit_k, head)."""
        wanted = set(check_keep_float(keep_float))
        if "head" in wanted:
            wanted |= set(HEAD_STAGES)
        return [name for name, stage in self.nodes.items() if stage in wanted]

    def to_json(self) -> dict[str, Any]:
        """{"input", "boundaries", "nodes": {stage: [node names]}}: what the file's metadata records."""
        grouped: dict[str, list[str]] = {stage: [] for stage in self.boundaries}
        for name, stage in self.nodes.items():
            grouped.setdefault(stage, []).append(name)
        return {"input": self.input, "boundaries": dict(self.boundaries), "nodes": grouped}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageMap:
        nodes = {name: stage for stage, names in data["nodes"].items() for name in names}
        return cls(dict(data["boundaries"]), nodes, data.get("input", "images"))


def check_keep_float(stages: Iterable[str]) -> tuple[str, ...]:
    """The --keep-float stages, checked: each one of stem, unit_0 ... unit_15, head (in forward order)."""
    stages = tuple(dict.fromkeys(s.strip() for s in stages if s.strip()))
    unknown = [s for s in stages if s not in KEEP_FLOAT_STAGES]
    if unknown:
        raise InputError(
            f"--keep-float names stages of the source model: stem, unit_0 ... unit_{UNIT_COUNT - 1}, head; "
            f"received {', '.join(unknown)}"
        )
    return tuple(s for s in KEEP_FLOAT_STAGES if s in stages)


def _graph_index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], set[str]]:
    """producer of each tensor, consumers of each tensor, and the tensors that are constants."""
    producers, consumers = {}, {}
    for node in graph.node:
        for name in node.output:
            producers[name] = node
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    constants = {init.name for init in graph.initializer}
    for node in graph.node:  # topological order: a node of constants only makes constants
        if all(name in constants for name in node.input if name):
            constants.update(node.output)
    return producers, consumers, constants


def _data_inputs(node: Any) -> list[str]:
    """The operands of an addition (QLinearAdd carries scales and zero points between them)."""
    return [node.input[0], node.input[3]] if node.op_type == "QLinearAdd" else list(node.input[:2])


def find_stages(model: Any, where: str = "the ONNX file") -> StageMap:
    """The stage map of a ResNet-34 ONNX graph (ours, torch's, torchvision's, quantized or float16).

    Raises InputError naming what does not fit where the graph is not a ResNet-34.
    """
    graph = model.graph
    producers, consumers, constants = _graph_index(graph)
    outputs = {value.name for value in graph.output}
    convs = [node for node in graph.node if node.op_type in CONV_OPS]
    adds = [
        node
        for node in graph.node
        if node.op_type in ADD_OPS and all(name not in constants for name in _data_inputs(node))
    ]
    pools = [node for node in graph.node if node.op_type in POOL_OPS]
    heads = [node for node in graph.node if node.op_type in HEAD_OPS]
    if (len(convs), len(adds), len(pools)) != (CONV_COUNT, ADD_COUNT, 1) or not heads:
        raise InputError(
            f"{where} is not a ResNet-34 graph: expected {CONV_COUNT} convolutions, {ADD_COUNT} residual additions, "
            f"one max-pool and a Dense head; found {len(convs)}, {len(adds)}, {len(pools)} and {len(heads)}"
        )

    def carried(tensor: str) -> str:
        while tensor not in outputs and len(consumers.get(tensor, [])) == 1:
            (node,) = consumers[tensor]
            if node.op_type not in CARRY_OPS:
                break
            tensor = node.output[0]
        readers = consumers.get(tensor, [])
        if len(readers) > 1 and all(node.op_type == "DequantizeLinear" for node in readers):
            tensor = readers[0].output[0]  # one dequantized copy per reader: the same values
        return tensor

    boundaries = {"stem": carried(pools[0].output[0])}
    boundaries.update({unit: carried(add.output[0]) for unit, add in zip(UNITS, adds, strict=True)})
    boundaries["pooled"] = heads[-1].input[0]
    final = graph.output[0].name
    back, node = final, producers.get(final)
    while node is not None and node.op_type in CARRY_OPS - {"Relu"}:
        back = node.input[0]
        node = producers.get(back)
    if node is not None and node.op_type == "Softmax":
        boundaries["logits"], boundaries["output"] = node.input[0], final
    else:
        boundaries["logits"] = final
    nodes: dict[str, str] = {}
    for stage, tensor in boundaries.items():
        stack = [producers[tensor]] if tensor in producers else []
        while stack:
            node = stack.pop()
            if node.name in nodes:
                continue
            nodes[node.name] = stage
            stack += [producers[name] for name in node.input if name in producers]
    last = next(reversed(boundaries))
    for node in graph.node:  # what no boundary depends on (a trailing Cast, dead shape arithmetic)
        nodes.setdefault(node.name, last)
    unnamed = [node for node in graph.node if not node.name]
    if unnamed:
        raise InputError(f"{where}: {len(unnamed)} nodes have no name; expected every node named (ONNX's checker)")
    return StageMap(boundaries, {node.name: nodes[node.name] for node in graph.node}, graph.input[0].name)


def name_nodes(model: Any) -> Any:
    """Give every unnamed node a unique name (``<op>_<index>``), in place: stage maps and exclusions name nodes."""
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def stage_map_metadata(stage_map: StageMap) -> str:
    """The stage map as the compact JSON the file's metadata_props record under ``stage_map``."""
    return json.dumps(stage_map.to_json(), separators=(",", ":"))


def keep_float_text(stages: Sequence[str]) -> str:
    """'stem,unit_13,head' (or 'none'): how metadata and reports spell a set of stages."""
    return ",".join(stages) if stages else "none"
