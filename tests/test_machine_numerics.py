"""The CPU's numerics as a dimension: verdicts must not flip with TensorFlow's oneDNN kernels on or off.

TensorFlow turns oneDNN on by itself on CPUs with AVX-512 VNNI/BF16 or AMX (AMD Zen 4, recent Xeons) and leaves
it off elsewhere (Zen 3); it changes the rounding of every convolution and reduction. TF_ENABLE_ONEDNN_OPTS=1 / 0
forces either on any x86 CPU, but only before TensorFlow loads. The rest of the suite runs with this process's
setting; the other one runs here in a fresh process: the correct twins must AGREE where rounding alone differs most
(1x1 last units at 32x32, an odd non-square size, float32 training), and a planted bug must still be named.
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
from keras_impl._startup import freeze_framework_imports
freeze_framework_imports()  # a process of one job, as the command's
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

images = np.stack([seeded_images(3, 25, 19, seed=1 + k) for k in range(2)])
labels = np.random.default_rng(2).integers(0, 10, (2, 3))
model, torch_model = make_twins("float32", classifier_activation="softmax")
options = TrainingOptions(keras_optimizer=default_optimizer("adam", steps=2))
report = verify_training(model, torch_model, images, labels, options).to_json()
emit("train-float32-adam", agree=report["agree"], first=report["first_divergent_tensor"],
     ratios=report["worst_floor_ratio"])
"""


def _onednn_here() -> str:
    """'1' where this process's TensorFlow runs oneDNN kernels (asked of TensorFlow itself), else '0'."""
    from tensorflow.python.util import _pywrap_util_port

    return "1" if _pywrap_util_port.IsMklEnabled() else "0"


OTHER = {"1": "0", "0": "1"}


@pytest.fixture(scope="module")
def probes() -> dict[str, subprocess.Popen]:
    """The probe under the oneDNN setting this process does not run, started first (it waits on imports)."""
    setting = OTHER[_onednn_here()]
    process = subprocess.Popen(
        [sys.executable, "-c", _PROBE.format(tests=str(Path(__file__).parent))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting},
    )
    yield {setting: process}
    process.kill()


def _verdicts(probes: dict[str, subprocess.Popen], setting: str) -> dict[str, dict]:
    process = probes[setting]
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return {row["case"]: row for row in map(json.loads, stdout.splitlines())}


def test_the_setting_is_forced_by_the_environment_variable():
    """What the fixture relies on: TF_ENABLE_ONEDNN_OPTS decides, and TensorFlow says which it runs."""
    forced = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if forced in ("0", "1"):
        assert _onednn_here() == forced


def test_verdicts_hold_under_the_other_onednn_setting(probes):
    (setting,) = probes
    verdicts = _verdicts(probes, setting)
    for size in ("32x32", "17x23"):
        row = verdicts[f"verify-{size}"]
        assert row["agree"], row
    row = verdicts["train-float32-adam"]
    assert row["agree"], row
    planted = verdicts["verify-planted-epsilon"]
    assert not planted["agree"] and planted["stage"] == "unit_5", planted
    assert planted["diagnosis"]["cause_id"] == "BN_EPSILON", planted
