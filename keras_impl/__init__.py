"""The book's ResNet-34 in Keras 3 (NHWC), backend-agnostic: TensorFlow, JAX or PyTorch."""

import importlib.util
import os
import sys
import tempfile

# TensorFlow's C++ start-up chatter hides the output people came for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _load_triton_before_tensorflow() -> None:
    # With torch's CUDA build (which ships triton), loading triton AFTER TensorFlow segfaults; loading
    # it first is fine (docs/pitfalls.md). Keras may import TensorFlow, so triton goes first, if installed.
    if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 pointed away, then restore it.

    TensorFlow 2.21 writes absl's "All log messages before absl::InitializeLog()" and, on CPUs where it turns
    oneDNN on, "oneDNN custom operations are on" from C++ while it loads, whatever TF_CPP_MIN_LOG_LEVEL says:
    a one-line error would become five. Only the import is silenced: what TensorFlow writes later (real
    errors) still shows, and what it wrote while failing to import is replayed before the exception.
    """
    if "tensorflow" in sys.modules or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    if importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_load_triton_before_tensorflow()
_import_tensorflow_quietly()

from keras_impl.padding import CONVENTIONS  # noqa: E402
from keras_impl.residual_unit import ResidualUnit  # noqa: E402
from keras_impl.resnet34 import STAGES, build_resnet34  # noqa: E402

__all__ = ["CONVENTIONS", "STAGES", "ResidualUnit", "build_resnet34"]
