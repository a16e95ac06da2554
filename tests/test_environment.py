"""Process-level guarantees: TensorFlow and triton in one process whatever the import order around ours, a CLI that
answers --help without TensorFlow or torch, backend-agnostic Keras code, and the memory a run needs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import keras
import pytest
import torch
from logits import LABELS, hostile_logits

from conversion.training import CASE_CLIPPED, CASE_DOUBLE_SOFTMAX, torch_loss

# Under the chosen Keras backend, in a process that freezes the frameworks' imports as the command's does (whether
# they were frozen, and the collector is back on): Keras's sparse crossentropy of the softmax of the hostile loss
# logits (argv: logits and labels as JSON), with from_logits False and True, as one JSON line; then converts the
# seed-0 hostile twins and prints the max rel. error of their logits.
_PARITY_SCRIPT = """
import gc, json, sys
from keras_impl._startup import freeze_framework_imports
freeze_framework_imports()
import numpy as np, torch, keras, keras_impl, conversion
print("frozen", gc.get_freeze_count() > 0, "collector", gc.isenabled(), flush=True)
logits, labels = np.array(json.loads(sys.argv[1])), np.array(json.loads(sys.argv[2]))
losses = dict()
for from_logits in (False, True):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, dtype="float64")
    value = loss(labels, keras.activations.softmax(keras.ops.convert_to_tensor(logits)))
    losses[str(from_logits)] = float(keras.ops.convert_to_numpy(value))
print("losses", json.dumps(losses), flush=True)
from conversion.arrays import max_rel_err, nhwc_to_nchw, seeded_images
from conversion.hostile import randomize_weights
model = keras_impl.build_resnet34(input_shape=(None, None, 3), classifier_activation=None, dtype="{dtype}")
randomize_weights(model, 0)
twin = conversion.keras_to_torch(model)
images = seeded_images(2, 48, 40, dtype="{dtype}")
with torch.no_grad():
    torch_logits = twin(torch.from_numpy(nhwc_to_nchw(images))).numpy()
print(keras.backend.backend(), max_rel_err(torch_logits, keras.ops.convert_to_numpy(model(images))))
"""


# TensorFlow, the default backend, is what every in-process test runs on (float64 parity ~1e-15 there).
BACKENDS = ["torch"] + (["jax"] if importlib.util.find_spec("jax") else [])
# Ours first (the README's order, and isort's: conversion sorts before keras), then what a user imports; torchvision
# loads triton through torch._dynamo. Then TensorFlow first, which holds its LLVM globally: triton must be refused
# with an ImportError (torch then runs without it), never crash the process.
OURS_FIRST = """
import conversion, keras, keras_impl, torch, torchvision, sys
import torch._dynamo
import tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)  # raises once the runtime has started
print(float(tf.constant(1.0) + 1), file=sys.stderr)  # the runtime starts: nothing more on stderr
print("alive", "triton" in sys.modules)
"""
TENSORFLOW_FIRST = """
import keras, keras_impl, torch, torchvision, sys
try:
    import triton
except ImportError as error:
    print("refused:", error)
print("alive", "triton" in sys.modules)
"""
# The command's --help and each subcommand's, and two refused commands: whether TensorFlow or torch got imported.
# How long they take is measured by benchmarks.cli_startup, never here: this process starts beside four that import
# TensorFlow and torch, and CI timed it at 1.4 s where it takes 0.2 s alone on a 2-core EPYC.
HELP = """
import sys
from conversion.cli import main
for argv in (["--help"], ["verify", "--help"], ["convert", "--help"], ["export-onnx", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
# Bad arguments are refused before the frameworks load too (one line each on stderr, exit 2).
for argv in (["verify", "--train", "--steps", "0"], ["convert", "missing.pt", "out.keras"]):
    assert main(argv) == 2, argv
heavy = sorted(m for m in ("tensorflow", "torch", "keras", "jax") if m in sys.modules)
# A pickle given to convert is refused by torch alone, before TensorFlow loads.
import os, pickle, tempfile
evil = os.path.join(tempfile.mkdtemp(), "evil.pt")
with open(evil, "wb") as handle:
    pickle.dump({"stem_conv.weight": 1}, handle)
assert main(["convert", evil, evil + ".keras"]) == 2
loaded = sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
print("pickle-refused-with", ",".join(loaded) or "none", file=sys.stderr)
print("heavy", ",".join(heavy) or "none", file=sys.stderr)
"""
TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def processes() -> dict[str, subprocess.Popen]:
    """Every fresh-process check of this file, started at once: they wait on imports, not on each other."""

    def start(code: str, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )

    started = {"ours-first": start(OURS_FIRST), "tensorflow-first": start(TENSORFLOW_FIRST), "help": start(HELP)}
    for backend in BACKENDS:
        loss_inputs = json.dumps(hostile_logits("float64").tolist()), json.dumps(LABELS.tolist())
        started[backend] = start(
            _PARITY_SCRIPT.format(dtype="float64"), *loss_inputs, KERAS_BACKEND=backend, JAX_ENABLE_X64="1"
        )
    yield started
    for process in started.values():
        process.kill()


_RESULTS: dict[int, tuple[int, str, str]] = {}  # by process: two tests read the torch backend's


def _result(processes: dict[str, subprocess.Popen], name: str) -> tuple[int, str, str]:
    process = processes[name]
    if id(process) not in _RESULTS:
        stdout, stderr = process.communicate(timeout=600)
        _RESULTS[id(process)] = process.returncode, stdout, stderr
    return _RESULTS[id(process)]


def test_our_packages_first_let_tensorflow_and_triton_share_the_process(processes):
    """With torch's CUDA build, loading triton after TensorFlow 2.20+ segfaults (TensorFlow loads its core library
    RTLD_GLOBAL, and triton binds its LLVM calls to TensorFlow's; docs/pitfalls.md). Imported first, keras_impl or
    conversion make TensorFlow load RTLD_LOCAL: triton then loads after it, as torchvision does, and works."""
    code, stdout, stderr = _result(processes, "ours-first")
    assert code == 0 and stdout.split() == ["alive", str(TRITON)], (code, stdout, stderr[-2000:])
    # keras_impl lists TensorFlow's devices while its start-up output is captured (the full build's "failed call to
    # cuInit"): listing must leave the runtime unstarted, so that thread settings can still be made.
    assert "cuInit" not in stderr, stderr[-2000:]


def test_after_a_global_tensorflow_triton_is_refused_in_one_line_instead_of_crashing(processes):
    code, stdout, stderr = _result(processes, "tensorflow-first")
    assert code == 0 and stdout.splitlines()[-1] == "alive False", (code, stdout, stderr[-2000:])
    if TRITON:
        refusal = stdout.splitlines()[0]
        assert refusal.startswith("refused: triton is not loaded in this process") and refusal.count("\n") == 0


def test_help_and_bad_arguments_answer_without_tensorflow_or_torch(processes):
    """What keeps them fast is what they import; their time is a benchmark (python -m benchmarks.cli_startup)."""
    code, _, stderr = _result(processes, "help")
    assert code == 0, stderr
    _, refused_with, _, heavy = stderr.split()[-4:]
    assert heavy == "none", stderr
    assert refused_with == "none", stderr  # convert of a pickled .pt: torch read it, TensorFlow never loaded


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_keras_model_matches_the_twin_on_every_installed_backend(processes, backend):
    """No tf.* in keras_impl: the same code runs on every Keras backend and gives the twin's logits.

    The model is float64. On TensorFlow, the default backend, that proves the function (~1e-15,
    tests/test_model_parity.py). On torch and JAX, Keras 3.15's `backend.result_type("float64",
    "float32")` answers float32, so BatchNormalization computes a float64 model in float32 there
    (keras-team/keras#23704, open; JAX also needs x64 enabled): measured 4.0e-7 (torch) and 1.5e-7
    (jax, with JAX_ENABLE_X64=1), float32 rounding, so those backends are held to the float32
    tolerance. If Keras fixes it, tighten this to 1e-10.
    """
    code, stdout, stderr = _result(processes, backend)
    assert code == 0, stderr[-2000:]
    name, error = stdout.split()[-2:]
    assert name == backend and float(error) <= 1e-5, stdout


def test_a_commands_process_freezes_the_frameworks_imports_and_collects_after(processes):
    """freeze_framework_imports (the command's process calls it): TensorFlow's, Keras's and torch's objects are
    frozen once imported, and the cycle collector is on again for what the command makes."""
    code, stdout, stderr = _result(processes, "torch")
    assert code == 0, stderr[-2000:]
    assert "frozen True collector True" in stdout.splitlines(), stdout


def test_on_the_torch_backend_keras_clips_probabilities(processes):
    """Keras on its torch backend (the backend process above): no _keras_logits, so clipped probabilities, or a
    double softmax with from_logits=True; conversion.training's loss for that backend reproduces both (measured:
    equal; that backend's mean is float32, reproduced)."""
    code, stdout, stderr = _result(processes, "torch")
    assert code == 0, stderr[-2000:]
    (line,) = [line for line in stdout.splitlines() if line.startswith("losses ")]
    keras_values = {key == "True": value for key, value in json.loads(line.split(" ", 1)[1]).items()}
    logits = hostile_logits("float64")
    for from_logits, expected_case in ((False, CASE_CLIPPED), (True, CASE_DOUBLE_SOFTMAX)):
        loss = torch_loss(
            keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, dtype="float64"),
            output_activation="softmax",
            backend="torch",
        )
        assert loss.case(torch.float64) == expected_case
        value = float(loss(torch.softmax(torch.from_numpy(logits), -1), torch.from_numpy(LABELS)))
        assert abs(value - keras_values[from_logits]) <= 1e-14 * abs(keras_values[from_logits])


@pytest.mark.parametrize(
    "available_gb, workers, expected",
    [
        (24.0, 2, "memory: a run with 2 workers needs about 15 GB, 24.0 GB available"),
        (9.5, 0, "memory: a run in one process needs about 9 GB, 9.5 GB available"),
        (12.0, 2, "12.0 GB available; WARNING: too little, run `python3 -m pytest -n 0` (9 GB) instead"),
        (6.0, 0, "6.0 GB available; WARNING: too little, a test may be killed for memory"),
        (40.0, 4, "memory: a run with 4 workers needs over 15 GB, 40.0 GB available"),
        (None, 2, "memory: a run with 2 workers needs about 15 GB"),
    ],
)
def test_the_report_header_says_what_memory_a_run_needs_and_warns_where_it_is_too_little(
    available_gb: float | None, workers: int, expected: str
):
    from conftest import memory_line

    line = memory_line(available_gb, workers)
    assert line.endswith(expected), line  # the whole line where it does not warn
