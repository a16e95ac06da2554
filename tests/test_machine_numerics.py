"""The CPU's numerics as a dimension: verdicts must not flip with TensorFlow's oneDNN kernels on or off.

TensorFlow turns oneDNN on by itself on CPUs with AVX-512 VNNI/BF16 or AMX (AMD Zen 4, recent Xeons) and leaves
it off elsewhere (Zen 3); it changes the rounding of every convolution and reduction. TF_ENABLE_ONEDNN_OPTS=1 / 0
forces either on any x86 CPU, but only before TensorFlow loads, so each setting runs in a fresh process: the
correct twins must AGREE where rounding alone differs most (1x1 last units at 32x32, an odd non-square size,
float32 training), and planted bugs must still be named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in the fresh process: one JSON line per verdict.
_PROBE = """
import json, sys, copy
sys.path.insert(0, {tests!r})
import numpy as np, torch
from conftest import make_twins
from conversion.arrays import seeded_images
from conversion.verify import TrainingOptions, default_optimizer, verify_models, verify_training

def emit(name, **fields):
    print(json.dumps({{"case": name, **fields}}), flush=True)

keras_model, twin = make_twins("float32")
for size in [(32, 32), (17, 23)]:
    report = verify_models(keras_model, twin, seeded_images(2, *size, seed=1)).to_json()
    emit(f"verify-{{size[0]}}x{{size[1]}}", agree=report["agree"], diagnosis=report["diagnosis"],
         training=report["training_check"])
mutant = copy.deepcopy(twin)
mutant.unit_5.main_layers[1].eps = 1e-5  # planted: torch's BatchNorm epsilon
report = verify_models(keras_model, mutant, seeded_images(2, 17, 23, seed=1)).to_json()
emit("verify-planted-epsilon", agree=report["agree"], stage=report["first_divergent_stage"],
     diagnosis=report["diagnosis"])

images = np.stack([seeded_images(4, 45, 38, seed=1 + k) for k in range(2)])
labels = np.random.default_rng(2).integers(0, 10, (2, 4))
model, torch_model = make_twins("float32", classifier_activation="softmax")
pristine = copy.deepcopy(torch_model), model.get_weights()
options = TrainingOptions(keras_optimizer=default_optimizer("adam", steps=2))
report = verify_training(model, torch_model, images, labels, options).to_json()
emit("train-float32-adam", agree=report["agree"], first=report["first_divergent_tensor"],
     ratios=report["worst_floor_ratio"])
torch_model = pristine[0]
model.set_weights(pristine[1])
for module in torch_model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
        module.momentum = 0.99  # planted: Keras's momentum given to torch unconverted
options = TrainingOptions(keras_optimizer=default_optimizer("nesterov"))
report = verify_training(model, torch_model, images[:1], labels[:1], options).to_json()
emit("train-planted-momentum", agree=report["agree"], first=report["first_divergent_tensor"],
     diagnosis=report["diagnosis"])
"""


@pytest.fixture(scope="module")
def probes() -> dict[str, subprocess.Popen]:
    """The probe under oneDNN on and off, both started at once (they wait on imports, not on each other)."""
    script = _PROBE.format(tests=str(Path(__file__).parent))
    started = {
        setting: subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting},
        )
        for setting in ("1", "0")
    }
    yield started
    for process in started.values():
        process.kill()


def _verdicts(probes: dict[str, subprocess.Popen], setting: str) -> dict[str, dict]:
    process = probes[setting]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return {row["case"]: row for row in map(json.loads, stdout.splitlines())}


@pytest.mark.parametrize("setting", ["1", "0"], ids=["onednn-on", "onednn-off"])
def test_verdicts_hold_with_onednn_on_and_off(probes, setting):
    verdicts = _verdicts(probes, setting)
    for size in ("32x32", "17x23"):
        row = verdicts[f"verify-{size}"]
        assert row["agree"], row
    row = verdicts["train-float32-adam"]
    assert row["agree"], row
    planted = verdicts["verify-planted-epsilon"]
    assert not planted["agree"] and planted["stage"] == "unit_5", planted
    assert planted["diagnosis"]["cause_id"] == "BN_EPSILON", planted
    momentum = verdicts["train-planted-momentum"]
    assert not momentum["agree"] and momentum["first"]["kind"] == "batchnorm statistic", momentum
    assert momentum["diagnosis"]["cause_id"] == "BN_MOMENTUM_UNCONVERTED", momentum
