"""Deployment precision: ONNX files lowered to fp16 or int8 (stages of the source kept in float32 on request),
checked against their source stage by stage and over a dataset, and the smallest set of stages to keep in float32.

Light to import: TensorFlow, torch and onnxruntime load inside the functions that need them.
"""

from conversion.deploy.lower import CALIBRATION_METHODS, PRECISIONS, Lowered, export_deployed, lower_onnx
from conversion.deploy.report import DeploymentCheck
from conversion.deploy.stage_map import KEEP_FLOAT_STAGES, StageMap, find_stages

__all__ = [
    "CALIBRATION_METHODS",
    "KEEP_FLOAT_STAGES",
    "PRECISIONS",
    "DeploymentCheck",
    "Lowered",
    "StageMap",
    "export_deployed",
    "find_stages",
    "lower_onnx",
]
