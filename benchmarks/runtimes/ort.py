"""ONNX Runtime on the two exports of the same weights: Keras (tf2onnx, NHWC) and the torch twin (NCHW).

CPU execution provider on a CPU; the CUDA and TensorRT providers on a GPU where this onnxruntime has
them. On a GPU the input is bound on the device (I/O binding), so the timed call moves no images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import SkipError
from benchmarks.runtimes import BaseRunner

# mode -> (export, execution provider, provider options, row dtype)
MODES = {
    "keras-onnx": ("keras", "CPUExecutionProvider", {}, "float32"),
    "torch-onnx": ("torch", "CPUExecutionProvider", {}, "float32"),
    # The Keras export lowered for deployment (conversion.deploy): fp16 (the CPU provider computes it in float32
    # between float16 tensors), and int8 QDQ with per-channel weights, one row per calibration method.
    "keras-onnx-fp16": ("keras-fp16", "CPUExecutionProvider", {}, "float16"),
    "keras-onnx-int8-minmax": ("keras-int8-minmax", "CPUExecutionProvider", {}, "int8"),
    "keras-onnx-int8-entropy": ("keras-int8-entropy", "CPUExecutionProvider", {}, "int8"),
    "keras-onnx-int8-percentile": ("keras-int8-percentile", "CPUExecutionProvider", {}, "int8"),
    # use_tf32=0: the CUDA provider uses TF32 by default, which is not float32
    "keras-onnx-cuda": ("keras", "CUDAExecutionProvider", {"use_tf32": "0"}, "float32"),
    "torch-onnx-cuda": ("torch", "CUDAExecutionProvider", {"use_tf32": "0"}, "float32"),
    # TensorRT builds float32 engines with TF32 allowed unless told otherwise: reported as tf32
    "keras-onnx-trt": ("keras", "TensorrtExecutionProvider", {}, "tf32"),
    "torch-onnx-trt": ("torch", "TensorrtExecutionProvider", {}, "tf32"),
}


def modes(device: str) -> tuple[str, ...]:
    """Modes measured on ``device``."""
    cpu = device == "cpu"
    return tuple(name for name, (_, provider, _, _) in MODES.items() if (provider == "CPUExecutionProvider") == cpu)


def setup(threads: int, device: str) -> dict:
    """Record onnxruntime's version and providers (threads are pinned per session)."""
    import onnxruntime as ort

    return {
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "intra_op_threads": threads,
        "inter_op_threads": 1,
    }


class OrtRunner(BaseRunner):
    """One InferenceSession on one export with one execution provider."""

    compiled = True

    def __init__(self, mode: str, device: str, spec: dict) -> None:
        import onnxruntime as ort

        if mode not in MODES:
            raise SkipError(f"unknown ort mode {mode!r}; expected one of {tuple(MODES)}")
        export, provider, provider_options, self.dtype = MODES[mode]
        available = ort.get_available_providers()
        if provider not in available:
            raise SkipError(f"onnxruntime {ort.__version__} has no {provider} (available: {', '.join(available)})")
        entry = spec["artifacts"]["onnx"].get(export) or {"skip": f"no {export} ONNX export was prepared"}
        if "skip" in entry:
            raise SkipError(entry["skip"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        start = time.perf_counter()
        providers = [(provider, provider_options)]
        if provider != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        self.session = ort.InferenceSession(
            str(Path(spec["artifacts"]["dir"]) / entry["path"]), options, providers=providers
        )
        self.build_s = entry["export_s"] + time.perf_counter() - start  # the export counts as compilation
        self.ort, self.on_gpu = ort, provider != "CPUExecutionProvider"
        spec_in = self.session.get_inputs()[0]
        self.input_name, self.output_name = spec_in.name, self.session.get_outputs()[0].name
        self.nhwc = spec_in.shape[-1] == 3
        options_text = ", ".join(f"{k}={v}" for k, v in provider_options.items())
        layout = "NHWC" if self.nhwc else "NCHW"
        self.flags = (
            f"{provider.removesuffix('ExecutionProvider')} EP{f' ({options_text})' if options_text else ''}, {layout}"
        )

    def load(self, images: np.ndarray) -> Any:
        host = images if self.nhwc else np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if not self.on_gpu:
            return {self.input_name: host}
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, self.ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0))
        binding.bind_output(self.output_name, "cuda")
        return binding

    def __call__(self, inputs: Any) -> Any:
        if not self.on_gpu:
            return self.session.run([self.output_name], inputs)[0]
        self.session.run_with_iobinding(inputs)
        inputs.synchronize_outputs()
        return inputs.get_outputs()[0]

    def fetch(self, outputs: Any) -> np.ndarray:
        return np.asarray(outputs if isinstance(outputs, np.ndarray) else outputs.numpy(), dtype=np.float32)


def make_runner(mode: str, device: str, spec: dict) -> OrtRunner:
    """The runner for ``mode`` on the prepared export."""
    return OrtRunner(mode, device, spec)
