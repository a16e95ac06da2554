"""Keras 3 on TensorFlow: eager call, ``tf.function``, ``predict_on_batch`` and XLA (``jit_compile=True``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks.common import IMAGE_SIZE, NUM_CLASSES, SkipError
from benchmarks.runtimes import BaseRunner

MODES = ("eager", "tf.function", "predict_on_batch", "xla")


def modes(device: str) -> tuple[str, ...]:
    """Modes measured on ``device`` (the same on CPU and GPU)."""
    return MODES


def setup(threads: int, device: str) -> dict:
    """Pin TensorFlow's thread pools (before its runtime starts) and check the device."""
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    gpus = tf.config.list_physical_devices("GPU")
    if device == "cuda" and not gpus:
        raise SkipError(f"TensorFlow {tf.__version__} sees no GPU (a CPU-only build, or no CUDA device)")
    import keras

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "gpus": [gpu.name for gpu in gpus],
        "tf32": bool(tf.config.experimental.is_tensor_float_32_execution_enabled()) if gpus else None,
    }


class KerasTFRunner(BaseRunner):
    """The book's model on TensorFlow in one of ``MODES``."""

    def __init__(self, mode: str, device: str, weights: str) -> None:
        import tensorflow as tf

        import keras_impl

        self.tf, self.mode = tf, mode
        self.device = "/GPU:0" if device == "cuda" else "/CPU:0"
        if device == "cuda":
            tf.config.experimental.enable_tensor_float_32_execution(False)  # float32 means float32
        with tf.device(self.device):
            self.model = keras_impl.build_resnet34(NUM_CLASSES, (*IMAGE_SIZE, 3), None, "float32")
            self.model.load_weights(weights)
        self.flags = "tf32=off" if device == "cuda" else ""
        self.sync = tf.test.experimental.sync_devices if device == "cuda" else (lambda: None)
        call = self._call
        if mode == "eager":
            self.forward = call
        elif mode == "tf.function":
            self.forward = tf.function(call)
        elif mode == "xla":
            self.forward = tf.function(call, jit_compile=True)
        elif mode == "predict_on_batch":
            self.forward = self.model.predict_on_batch  # numpy in, numpy out: host to host by design
            self.flags = ", ".join(filter(None, [self.flags, "host-to-host"]))
        else:
            raise SkipError(f"unknown keras-tf mode {mode!r}; expected one of {MODES}")
        self.compiled = mode != "eager"

    def _call(self, x: Any) -> Any:
        return self.model(x, training=False)

    def load(self, images: np.ndarray) -> Any:
        if self.mode == "predict_on_batch":
            return images
        with self.tf.device(self.device):
            return self.tf.constant(images)

    def __call__(self, inputs: Any) -> Any:
        outputs = self.forward(inputs)
        self.sync()
        return outputs

    def fetch(self, outputs: Any) -> np.ndarray:
        return np.asarray(outputs, dtype=np.float32)


def make_runner(mode: str, device: str, spec: dict) -> KerasTFRunner:
    """The runner for ``mode`` with the prepared weights."""
    return KerasTFRunner(mode, device, spec["artifacts"]["keras_weights"])
