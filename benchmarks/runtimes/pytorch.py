"""The torch twin: eager NCHW, channels_last, ``torch.compile``; on a GPU also TF32, fp16/bf16, CUDA graphs,
``mode="max-autotune"``, inference freezing, and the fused inference rewrite (``torch_impl.fuse``: BatchNorm
folded, conv + bias + residual + ReLU as one cuDNN call).

float32 rows on a GPU run with TF32 off (cuDNN allows it by default); TF32 is its own mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.common import NUM_CLASSES, SkipError
from benchmarks.runtimes import BaseRunner


@dataclass(frozen=True)
class Mode:
    """How one torch mode runs."""

    dtype: str = "float32"  # float32, tf32, float16, bfloat16
    channels_last: bool = False
    compile: str | None = None  # torch.compile mode ("default", "max-autotune"), None for eager
    freeze: bool = False  # torch._inductor.config.freezing: weights become constants, BN folded
    cuda_graph: bool = False  # manual torch.cuda.CUDAGraph capture of the eager model
    fused: bool = False  # torch_impl.fuse: folded BN, cuDNN conv+bias(+add)+ReLU kernels
    gpu_only: bool = False


MODES = {
    "eager": Mode(),
    "channels_last": Mode(channels_last=True),
    "compile": Mode(compile="default"),
    "compile-freeze": Mode(compile="default", freeze=True),
    "tf32": Mode(dtype="tf32", gpu_only=True),
    "fp16-cl": Mode(dtype="float16", channels_last=True, gpu_only=True),
    "bf16-cl": Mode(dtype="bfloat16", channels_last=True, gpu_only=True),
    "fp16-cl-cudagraph": Mode(dtype="float16", channels_last=True, cuda_graph=True, gpu_only=True),
    "fp16-cl-fused-cudagraph": Mode(dtype="float16", channels_last=True, fused=True, cuda_graph=True, gpu_only=True),
    "bf16-cl-fused-cudagraph": Mode(dtype="bfloat16", channels_last=True, fused=True, cuda_graph=True, gpu_only=True),
    "fp16-cl-max-autotune": Mode(dtype="float16", channels_last=True, compile="max-autotune", gpu_only=True),
    "fp16-cl-max-autotune-freeze": Mode(
        dtype="float16", channels_last=True, compile="max-autotune", freeze=True, gpu_only=True
    ),
}


def modes(device: str) -> tuple[str, ...]:
    """Modes measured on ``device``."""
    return tuple(name for name, mode in MODES.items() if device == "cuda" or not mode.gpu_only)


def setup(threads: int, device: str) -> dict:
    """Pin torch's thread pools and check the device."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if device == "cuda" and not torch.cuda.is_available():
        raise SkipError("no CUDA device (torch.cuda.is_available() is False)")
    info = {
        "torch": torch.__version__,
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "parallel": torch.__config__.parallel_info().splitlines()[:6],
    }
    if device == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(0),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        )
    return info


class TorchRunner(BaseRunner):
    """The twin (``torch_impl.ResNet34``) with the prepared weights, in one of ``MODES``."""

    def __init__(self, name: str, device: str, weights: str) -> None:
        import torch

        import torch_impl

        if name not in MODES:
            raise SkipError(f"unknown torch mode {name!r}; expected one of {tuple(MODES)}")
        mode = MODES[name]
        if mode.gpu_only and device != "cuda":
            raise SkipError(f"torch mode {name} is GPU-only")
        self.torch, self.mode, self.cuda = torch, mode, device == "cuda"
        self.dtype = mode.dtype
        self.device = torch.device("cuda" if self.cuda else "cpu")
        if self.cuda:
            tf32 = mode.dtype == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32  # True by default: float32 convs would silently be TF32
            torch.backends.cudnn.benchmark = True
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(mode.dtype, torch.float32)
        self.torch_dtype = torch_dtype
        self.memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
        model = torch_impl.ResNet34(num_classes=NUM_CLASSES, classifier_activation=None)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if mode.fused:
            model = torch_impl.fuse(model)
        self.model = model.eval().to(self.device, torch_dtype).to(memory_format=self.memory_format)
        self.forward = self.model
        if mode.compile:
            import torch._inductor.config

            torch._inductor.config.freezing = mode.freeze
            self.forward = torch.compile(self.model, mode=mode.compile, dynamic=False)  # one graph per batch
        self.compiled = bool(mode.compile or mode.cuda_graph)
        self.graphs: dict[tuple, tuple[Any, Any, Any]] = {}  # shape -> (graph, static input, static output)
        flags = [f"memory_format={'channels_last' if mode.channels_last else 'NCHW'}"]
        if self.cuda:
            flags.append(f"tf32={'on' if self.dtype == 'tf32' else 'off'}, cudnn.benchmark=on")
        if mode.compile:
            flags.append(f"compile={mode.compile}, freezing={'on' if mode.freeze else 'off'}")
        if mode.fused:
            flags.append("fused: BN folded, cuDNN conv+bias(+add)+ReLU")
        if mode.cuda_graph:
            flags.append("cuda-graph")
        self.flags = ", ".join(flags)

    def load(self, images: np.ndarray) -> Any:
        torch = self.torch
        host = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        graph = self.graphs.get(host.shape)
        if graph is not None:  # CUDA graphs replay on fixed buffers: the input goes into the captured one
            graph[1].copy_(host)
            return graph[1]
        return host.to(self.device, self.torch_dtype).contiguous(memory_format=self.memory_format)

    def compile(self, inputs: Any) -> float | None:
        """Capture a CUDA graph for this shape (cuda-graph mode); the seconds it took."""
        if not self.mode.cuda_graph:
            return None
        start = time.perf_counter()
        with self.torch.inference_mode():
            graph, outputs = capture_cuda_graph(self.model, inputs)
        self.graphs[tuple(inputs.shape)] = (graph, inputs, outputs)
        return time.perf_counter() - start

    def __call__(self, inputs: Any) -> Any:
        torch = self.torch
        graph = self.graphs.get(tuple(inputs.shape))
        if graph is not None:
            if inputs is not graph[1]:
                graph[1].copy_(inputs)
            graph[0].replay()
            outputs = graph[2]
        else:
            with torch.inference_mode():
                outputs = self.forward(inputs)
        if self.cuda:
            torch.cuda.synchronize()
        return outputs

    def fetch(self, outputs: Any) -> np.ndarray:
        return outputs.float().cpu().numpy()

    def recover(self) -> None:
        """Free cached GPU memory after a failure (an out-of-memory batch)."""
        if self.cuda:
            self.torch.cuda.empty_cache()


def capture_cuda_graph(forward: Callable[[Any], Any], inputs: Any) -> tuple[Any, Any]:
    """(graph, static output) of ``forward(inputs)``; replaying the graph recomputes it from ``inputs``."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as the CUDA graphs docs ask
        for _ in range(3):
            forward(inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = forward(inputs)
    torch.cuda.synchronize()
    return graph, outputs


def make_runner(mode: str, device: str, spec: dict) -> TorchRunner:
    """The runner for ``mode`` with the prepared weights."""
    return TorchRunner(mode, device, spec["artifacts"]["torch_weights"])
