"""Session fixtures: the twins are built, randomised and converted once per test session."""

from __future__ import annotations

import os

# Under pytest-xdist each worker is one process per core: one thread each, or TensorFlow's and torch's pools
# oversubscribe the cores and every worker waits on the other (set before either framework starts its pools).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(variable, "1")
# numpy asks the kernel for 2 MB pages for every array of 4 MB or more; the suite copies 21M-parameter models all
# the time, and each fresh huge page is zeroed (and compacted for) at first touch. Set here, in the process that
# starts the workers and subprocesses, before any of them imports numpy (a float64 training-parity run here: system
# time 5.4 -> 4.5 s, wall 11.7 -> 11.1 s).
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
# For the same reason, glibc's malloc keeps what is freed for the next allocation instead of handing it back to the
# kernel: blocks over 32 MB (a serialised model, tf2onnx's graph copies) are otherwise mapped fresh, and faulted in
# page by page, each time. Read when a process starts, so it reaches the workers and their subprocesses (one in-place
# run here: system time 82.1 s -> 77.7 s, peak memory per worker unchanged at 8.3 / 10.1 GB; a tf2onnx export
# alone: 6.9 s -> 5.5 s, page faults 1.86M -> 1.15M).
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184")

# isort: split
import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

# isort: split
import atexit
import gc
import importlib
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from keras_impl._startup import freeze_framework_imports

if TYPE_CHECKING:
    import keras
    import torch


def _exit_without_teardown() -> None:
    """A worker's last step: leave without tearing the interpreter down.

    By the time exit handlers run, the worker has reported every result, and pytest, TensorFlow and torch have run
    their own exit handlers (registered after this one, so called before it). What is left is freeing a heap of
    ~10 GB object by object, which the controller waits for: 2.3 s at the end of a run here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Nothing heavy at import: pytest-xdist's controller process loads this file too, and runs no test; the workers import
# TensorFlow and torch with the test modules, after keras_impl above, with the cycle collector paused and their
# objects frozen after (a worker lives to the end of the run, as a command's process does).
if "PYTEST_XDIST_WORKER" in os.environ:
    freeze_framework_imports()
    atexit.register(_exit_without_teardown)  # before the frameworks load: their handlers run first

SEED = 0


def make_twins(
    dtype: str,
    seed: int = SEED,
    num_classes: int = 10,
    classifier_activation: str | None = None,
    activation: str = "relu",
) -> tuple[keras.Model, torch.nn.Module]:
    """A Keras ResNet-34 with hostile weights (any input size) and its converted torch twin."""
    import conversion
    from conversion.hostile import randomize_weights

    model = keras_impl.build_resnet34(
        num_classes, (None, None, 3), classifier_activation, dtype, activation=activation, initialize_weights=False
    )
    randomize_weights(model, seed)  # every weight
    return model, conversion.keras_to_torch(model)


@pytest.fixture(scope="session")
def twins_f32() -> tuple[keras.Model, torch.nn.Module]:
    """float32 twins, logits head, hostile weights."""
    return make_twins("float32")


@pytest.fixture(scope="session")
def twins_f64() -> tuple[keras.Model, torch.nn.Module]:
    """float64 twins, logits head, hostile weights."""
    return make_twins("float64")


@pytest.fixture(scope="session")
def unit_twins() -> Callable[..., tuple[keras_impl.ResidualUnit, torch.nn.Module]]:
    """make(in_channels, filters, strides, dtype): a hostile Keras ResidualUnit (any H, W) and its torch twin.

    Cached for the session: each combination is built, randomised and converted once.
    """
    cache: dict[tuple, tuple[keras_impl.ResidualUnit, torch.nn.Module]] = {}

    def make(in_channels: int, filters: int, strides: int, dtype: str, seed: int = SEED):
        import conversion
        from conversion.hostile import randomize_weights

        key = (in_channels, filters, strides, dtype, seed)
        if key not in cache:
            unit = keras_impl.ResidualUnit(filters, strides=strides, dtype=dtype)
            unit.build((None, None, None, in_channels))
            randomize_weights(unit, seed)
            cache[key] = unit, conversion.keras_to_torch(unit)
        return cache[key]

    return make


# The longest files first (measured with `pytest --durations=0`): pytest-xdist hands files to workers in this order
# (pyproject.toml turns off its own reordering by test count), and a long file handed out last would keep one worker
# busy after the other has finished.
LONGEST_FIRST = (  # seconds in one run here, in brackets
    "test_train_verify.py",  # (79)
    "test_checkpoints.py",  # (72)
    "test_deploy_trained.py",  # (6) trains the digits model where it is not cached yet (+45 to +270)
    "test_deploy.py",  # (43)
    "test_onnx.py",  # (30)
    "test_torchvision_timm.py",  # (27)
    "test_files.py",  # (25)
    "test_verify.py",  # (24)
    "test_machine_numerics.py",  # (23)
    "test_book_code.py",  # (23)
    "test_environment.py",  # (18)
    "test_mutations.py",  # (14)
    "test_initializers.py",  # (11)
    "test_bad_input.py",  # (9)
    "test_converter.py",  # (8)
    "test_fusion.py",  # (8)
    "test_training_rules.py",  # (8)
    "test_benchmarks.py",  # (7)
    "test_model_parity.py",  # (5)
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest test files first (a stable sort: each file keeps its own order)."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep Python's cycle collector off the frameworks' own objects, and run it less often.

    After collection each worker holds TensorFlow's, Keras's and torch's modules (millions of objects that live to
    the end), and every full collection walked all of them: ~0.3 s each, ~11 s a worker in a run here. Frozen, they
    are skipped. A first threshold of 10,000 (Python's is 700) makes the young collections, and so the full ones,
    rarer; a full collection still frees the models' reference cycles, and the library collects where it drops GBs
    (onnx_export, training_steps). Measured here, one in-place run each: 256.6 s -> 242.2 s, full-collection time
    21.7 s -> 9.5 s over both workers, peak memory per worker unchanged (8.4 / 10.0 GB)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


# Peak memory of a whole run, measured here (README, Quick start): the processes of a two-worker run together, and the
# one process of `-n 0`. A worker the kernel kills for memory shows only as pytest-xdist's "node down".
PEAK_GB_TWO_WORKERS = 15
PEAK_GB_ONE_PROCESS = 9
_MEMORY_LINE = pytest.StashKey[str]()  # the header's line, repeated in the summary where it warns


def memory_line(available_gb: float | None, workers: int) -> str:
    """The report header's line on memory: what a run needs, what is free, and the fix where it is too little."""
    if workers > 1:  # measured with two; more workers need more
        needed, need = PEAK_GB_TWO_WORKERS, f"with {workers} workers needs {'about' if workers == 2 else 'over'}"
        fix = f"run `python3 -m pytest -n 0` ({PEAK_GB_ONE_PROCESS} GB) instead"
    else:
        needed, need, fix = PEAK_GB_ONE_PROCESS, "in one process needs about", "a test may be killed for memory"
    if available_gb is None:  # no /proc/meminfo (not Linux): nothing to compare
        return f"memory: a run {need} {needed} GB"
    line = f"memory: a run {need} {needed} GB, {available_gb:.1f} GB available"
    return line if available_gb >= needed else f"{line}; WARNING: too little, {fix}"


def pytest_report_header(config: pytest.Config) -> str:
    """The line on memory at the top of the report."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available_gb: float | None = int(fields["MemAvailable"].split()[0]) / 1e6
    except (OSError, KeyError, ValueError):
        available_gb = None
    workers = getattr(config.option, "numprocesses", 0) or 0  # pytest-xdist's -n, a number by now
    line = memory_line(available_gb, workers if isinstance(workers, int) else 2)
    config.stash[_MEMORY_LINE] = line
    return line


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The memory warning again at the end, where a worker killed for memory shows as "node down"."""
    line = config.stash.get(_MEMORY_LINE, "")
    if "WARNING" in line:
        terminalreporter.write_line(line)


# Set by .ci/run: there the peers must import, so a skip would hide a missing install step.
REQUIRE_PEERS = os.environ.get("RESNET34_PARITY_REQUIRE_PEERS") == "1"


# Installed beside the test extra with --no-deps: its tensorflow-text requirement pins a tensorflow of its own.
_NO_DEPS = {"keras_hub": '"keras-hub==0.32.*"'}


def import_peer(name: str) -> types.ModuleType:
    """A library of the test extra (code nobody here wrote: torchvision, timm, transformers, tf_keras, keras-hub...);
    a skip naming the fix where it cannot be imported.

    PyPI's torchvision is built against torch's default (CUDA) build and does not import beside the CPU build
    of another version ("operator torchvision::nms does not exist"). Under .ci/run the skip is a failure.
    """
    import torch

    try:
        return importlib.import_module(name)
    except Exception as error:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
        install = (
            f"install it with `python3 -m pip install --no-deps {_NO_DEPS[name]}`"
            if name in _NO_DEPS
            else 'install a matching pair, e.g. `python3 -m pip install -e ".[test]"` in a fresh virtual environment'
        )
        reason = (
            f"{name} cannot be imported beside torch {torch.__version__} ({str(error).splitlines()[0][:100]}); "
            f"{install} (README, Quick start)"
        )
        if REQUIRE_PEERS:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def torchvision():
    """torchvision (skips, or fails under .ci/run, where it cannot be imported)."""
    return import_peer("torchvision")


@pytest.fixture(scope="session")
def timm():
    """timm (skips, or fails under .ci/run, where it cannot be imported)."""
    return import_peer("timm")
