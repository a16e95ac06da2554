"""What ``import keras_impl`` arranges before anything heavy loads: TensorFlow loaded locally and quietly, so
that it never meets triton, and the project's Keras layers registered as soon as Keras loads.

- TensorFlow 2.20+ wheels load their core library with RTLD_GLOBAL (``tensorflow.python.pywrap_dlopen_global_flags``),
  which puts TensorFlow's statically linked LLVM among the process's global symbols. triton, which torch's CUDA build
  ships and which torchvision loads through ``torch._dynamo``, then binds its own LLVM calls to TensorFlow's and
  crashes the interpreter (SIGSEGV). Where this runs before TensorFlow loads, TensorFlow is served a no-op in place
  of that flags module, so it loads RTLD_LOCAL, as it does on every other platform, and triton loads after it safely.
- Where TensorFlow was loaded globally before this ran and triton has not been, ``import triton`` raises a one-line
  ModuleNotFoundError instead of crashing; torch takes it for "triton is not installed" (torchvision and torch on a
  CPU work without it).
- TensorFlow 2.21 writes start-up lines from C++ on file descriptor 2 (absl's "All log messages before
  absl::InitializeLog() is called are written to STDERR", on CPUs where it turns oneDNN on "oneDNN custom
  operations are on", and, from the full build on a machine without a GPU driver, "failed call to cuInit" when it
  first lists its devices), whatever TF_CPP_MIN_LOG_LEVEL says: while ``tensorflow`` itself executes and lists its
  devices, fd 2 points at a temporary file, replayed if the import fails, so a one-line error stays one line.
  Later output is untouched.

- ``import keras_impl`` imports no Keras (the model code loads on first use), yet a ``.keras`` file of the project's
  layers must load with ``import keras_impl`` and ``keras.models.load_model``: the layer modules, whose
  ``register_keras_serializable`` is what the loader looks up, are imported as soon as Keras finishes loading.
- A process that runs one command and exits (``resnet34-parity``) may ask for ``freeze_framework_imports``: see there.

Everything here is cheap: nothing is imported until TensorFlow, Keras (or triton) is.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType
from typing import Any

_GLOBAL_FLAGS = "tensorflow.python.pywrap_dlopen_global_flags"
TRITON_REFUSED = (
    "triton is not loaded in this process: TensorFlow was imported before keras_impl or conversion and holds its "
    "LLVM symbols globally, and triton crashes against them; import keras_impl or conversion first to use both"
)


@contextlib.contextmanager
def _fd2_captured() -> Iterator[None]:
    """Point file descriptor 2 at a temporary file for the block; replay what it caught if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _LocalFlags(importlib.abc.Loader):
    """The flags module TensorFlow asks for, made a no-op: TensorFlow then loads RTLD_LOCAL."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.set_dlopen_flags = lambda: None
        module.reset_dlopen_flags = lambda: None


LAYER_MODULES = ("keras_impl.padding", "keras_impl.residual_unit")  # their classes are registered with Keras


def register_layers() -> None:
    """Import the modules whose layers Keras must know by name (``resnet34_parity>ResidualUnit``, ...)."""
    for name in LAYER_MODULES:
        importlib.import_module(name)


_FROZEN_FRAMEWORKS = ("tensorflow", "keras", "torch")
_freezing = False  # set by freeze_framework_imports


def freeze_framework_imports() -> None:
    """For a process that runs one command and exits: pause Python's cycle collector while TensorFlow, Keras or torch
    loads, then freeze what the import made (``gc.freeze``), so that later collections skip it.

    Those imports make ~800k objects, which live as long as the process. Collected as they come, they are walked
    again at every collection of an older generation: a process importing conversion, Keras, torch and torchvision
    took 6.0-6.2 s of user CPU here, and 3.9-4.0 s with this. Not done by default: frozen objects are never
    collected, and a long-lived process (a notebook) may hold garbage of its own when it imports us.
    """
    global _freezing
    _freezing = True
    prepare()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cycle collector paused for the block, and what it made frozen after (outermost block only)."""
    if not _freezing or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


class _WrappedLoader(importlib.abc.Loader):
    """A package's own loader: TensorFlow's with fd 2 captured while it executes, Keras's followed by the layers,
    each (and torch's) with the collector paused where ``freeze_framework_imports`` asked for it."""

    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self._inner, self._name = inner, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _collector_paused():
            self._exec_module(module)

    def _exec_module(self, module: ModuleType) -> None:
        if self._name == "tensorflow":
            with _fd2_captured():
                self._inner.exec_module(module)
                # The full (CUDA) build says "failed call to cuInit" on fd 2 where no GPU driver is found, when
                # TensorFlow first lists its devices: listed here, inside the capture. Listing does not start
                # the runtime, so thread and device settings can still be made afterwards.
                module.config.list_physical_devices()
        elif self._name == "keras":
            self._inner.exec_module(module)
            register_layers()
        else:
            self._inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: the package's loader answers
        return getattr(self._inner, name)


class _FrameworkLoading(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` (loaded quietly), its RTLD_GLOBAL flags module (a no-op), ``keras`` (then our layers)
    and, where ``freeze_framework_imports`` asked, ``torch``; nothing else."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == _GLOBAL_FLAGS:
            if "tensorflow" in sys.modules and _GLOBAL_FLAGS not in sys.modules:
                return importlib.util.spec_from_loader(fullname, _LocalFlags())
            return None
        wrapped = _FROZEN_FRAMEWORKS if _freezing else ("tensorflow", "keras")
        if fullname not in wrapped or fullname in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WrappedLoader(spec.loader, fullname)
        return spec


class _TritonRefused(importlib.abc.MetaPathFinder):
    """Answers ``triton`` as not installed, with a one-line reason, where it would crash against a global TensorFlow.

    A ModuleNotFoundError, not any ImportError: torch asks ``importlib.util.find_spec("triton")`` and takes that one
    (and only that one) for "triton is absent"."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "triton" or fullname.startswith("triton."):
            raise ModuleNotFoundError(TRITON_REFUSED, name=fullname)
        return None


def prepare() -> None:
    """Make the process safe for TensorFlow and triton together, TensorFlow's start-up quiet, and the project's
    layers known to Keras whenever it loads (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's Python-side chatter
    installed = {type(finder) for finder in sys.meta_path}
    tensorflow_loaded_globally = _GLOBAL_FLAGS in sys.modules and not isinstance(
        getattr(sys.modules[_GLOBAL_FLAGS], "__loader__", None), _LocalFlags
    )
    if tensorflow_loaded_globally and "triton" not in sys.modules and _TritonRefused not in installed:
        sys.meta_path.insert(0, _TritonRefused())
    if _FrameworkLoading not in installed and not ("tensorflow" in sys.modules and "keras" in sys.modules):
        sys.meta_path.insert(0, _FrameworkLoading())
    if "keras" in sys.modules:  # Keras came first: its layers are registered now
        register_layers()
