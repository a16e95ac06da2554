"""Noise floors: how far rounding alone moves a result, measured for every comparison.

A difference between two implementations means something only against the difference that rounding alone
produces for the same function, at the same size, on the same machine (its kernels, the number of values
each BatchNorm averages, the statistics of the weights, the steps of a training run). A fixed tolerance
cannot know these, so each side of a comparison gets a *floor twin*, and its floor is the distance between
the side and its floor twin, on the reference's scale:

- float32: the floor twin holds the same weights in float64 and takes the same images in float64. The side's
  float32 result minus the twin's is exactly what float32 rounding did to it.
- float64: no wider float is at hand, so the floor twin is the same float64 function with every weight and
  every input element moved by one ulp, up or down at random: the spread that rounding of that size produces
  downstream (measured here on the twins at 17x23 to 224x224: the cross-framework float64 error is 0.38 to
  0.91 times the floor so measured).

The floor of a comparison is floor_a + floor_b. A difference fails only when it is beyond FLOOR_MULTIPLE
times its floor AND beyond the absolute bound; a ported bug adds its own effect, which no rounding explains.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import keras
import numpy as np
import torch
from torch import nn

from keras_impl.layers import random_draws_skipped

# Errors up to this multiple of their floor are rounding, per compared dtype (each has its own way of measuring
# the floor). Every planted porting bug sits far beyond both (docs/what-it-catches.md gives each one's ratio).
# - float32: the floor is exact, and the triangle inequality bounds a correct pair's ratio by 1 plus the distance
#   of the two float64 results over the floor (~1e-8): measured at most 0.92 in inference (five sizes) and 1.00 in
#   training (every step of five optimizers, 45x38 and 224x224). 2 leaves room for that and nothing else.
# - float64: the floor is one draw of one-ulp moves, a statistical estimate with a long tail where few numbers
#   carry a tensor's maximum (a BatchNorm's 64 biases, the scalar loss): measured at most 0.91 in inference; in
#   training 10.6 (six steps at 45x38, five optimizers x three seeds) and 14.8 (two steps at 224x224, SGD and Adam
#   x three seeds: an Adam velocity of a BatchNorm bias). 64 keeps ~4x over that tail, and a float64 bug sits at
#   >= 1e6 x its floor; below 1e-10 the absolute bound decides anyway.
FLOOR_MULTIPLE = {"float32": 2.0, "float64": 64.0}
# A hypothesis explains a divergence when what is left of it is within the floor, or under 5% of it.
EXPLAINED = 0.05


@dataclass(frozen=True)
class Judgement:
    """One difference judged against its noise floor and its absolute bound."""

    error: float  # max |a - b| / max |reference|
    noise_floor: float  # floor_a + floor_b on the same scale
    floor_ratio: float  # error / noise_floor (inf where the floor is 0 or not finite and the error is not 0)
    bound: float  # the absolute bound, the second gate
    multiple: float  # how many floors rounding may reach (FLOOR_MULTIPLE of the compared dtype)
    ok: bool  # error <= bound or floor_ratio <= multiple
    ill_conditioned: bool  # rounding alone exceeds the absolute bound here (noise_floor > bound)

    def to_dict(self) -> dict:
        """The JSON form: error, noise_floor, floor_ratio, bound, floor_multiple, ok, ill_conditioned."""
        return {
            "error": self.error,
            "noise_floor": self.noise_floor,
            "floor_ratio": self.floor_ratio,
            "bound": self.bound,
            "floor_multiple": self.multiple,
            "ok": self.ok,
            "ill_conditioned": self.ill_conditioned,
        }


def ratio(error: float, floor: float) -> float:
    """error / floor; 0 for no error, inf for an error over a zero or non-finite floor."""
    if error == 0:
        return 0.0
    if not (math.isfinite(floor) and floor > 0) or not math.isfinite(error):
        return math.inf
    return error / floor


def floor_multiple(dtype: str) -> float:
    """FLOOR_MULTIPLE of a compared dtype (float64's for anything but float32)."""
    return FLOOR_MULTIPLE["float32" if dtype == "float32" else "float64"]


def judge(error: float, noise_floor: float, bound: float, multiple: float) -> Judgement:
    """Pass unless ``error`` is beyond both ``multiple`` x ``noise_floor`` and ``bound``."""
    r = ratio(error, noise_floor)
    ok = math.isfinite(error) and (error <= bound or r <= multiple)
    ill = math.isfinite(noise_floor) and noise_floor > bound
    return Judgement(error, noise_floor, r, bound, multiple, ok, ill)


def scaled_distance(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """max |a - b| / scale in float64 (inf where either holds NaN/Inf or the shapes differ)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return math.inf
    return float(diff.max() / scale) if diff.size else 0.0


def scale_of(reference: np.ndarray) -> float:
    """max |reference| (1 where it is 0, empty or not finite): the denominator every error of a comparison shares."""
    reference = np.asarray(reference, np.float64)
    finite = reference[np.isfinite(reference)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    return scale if scale > 0 else 1.0


# --- floor twins ---------------------------------------------------------------------------------------


_SAME_SIZE_INTS = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def one_ulp_apart(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each element moved by one ulp of its own dtype, up or down at random (zeros to the smallest subnormal):
    ``np.nextafter`` towards +inf or -inf, bit for bit."""
    array = np.asarray(array)
    up = rng.integers(0, 2, array.shape, dtype=np.uint8).view(bool)
    ints = _SAME_SIZE_INTS.get(array.dtype)
    if ints is None:
        return np.nextafter(array, np.where(up, np.inf, -np.inf).astype(array.dtype))
    # IEEE floats are sign and magnitude: a finite non-zero one's neighbours are its bit pattern +-1, +1 away from
    # zero. The same values as np.nextafter, at a third of its time on 21M float64 weights (~0.1 s a model
    # instead of ~0.3 s): libm's nextafter is a call per element. Zeros and non-finite values go to nextafter.
    away = up != np.signbit(array)
    moved = np.subtract(array.view(ints), 1, out=np.empty(array.shape, ints))
    np.add(moved, 2, out=moved, where=away)
    result = moved.view(array.dtype)
    special = ~np.isfinite(array)
    special |= array == 0
    if special.any():
        infinity = np.array(np.inf, array.dtype)
        result[special] = np.nextafter(array[special], np.where(up[special], infinity, -infinity))
    return result


def floor_images(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The images a floor twin takes: float32 ones in float64 (exact), float64 ones one ulp apart."""
    images = np.asarray(images)
    if images.dtype == np.float64:
        return one_ulp_apart(images, np.random.default_rng(seed))
    return images.astype(np.float64)


# Rebuilding a Keras ResNet-34 layer by layer takes ~1 s; setting its weights ~0.15 s. One process (a keep-float
# search, a test suite) compares many models of one architecture, so a clone its caller has released is kept, by
# architecture and dtype, and handed out again with every weight (moving statistics included) reassigned.
_SPARE_CLONES: dict[str, keras.Model] = {}
SPARE_CLONES_KEPT = 2


def _architecture(model: keras.Model, dtype: str) -> str:
    return json.dumps([model.get_config(), model.input_shape, dtype], sort_keys=True, default=str)


def _rebuilt(model: keras.Model, dtype: str, architecture: str) -> keras.Model:
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)

    try:
        with random_draws_skipped():  # keras_clone assigns every weight next

            def rebuilt(layer: keras.layers.Layer) -> keras.layers.Layer:
                return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

            clone = keras.models.clone_model(
                model, input_tensors=keras.Input(shape=model.input_shape[1:], dtype=dtype), clone_function=rebuilt
            )
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])
    dtypes = {keras.backend.standardize_dtype(v.dtype) for v in clone.weights}
    if dtypes != {dtype}:  # a layer that ignores its dtype would make the floor a mixed-precision one
        raise ValueError(f"could not rebuild the Keras model in {dtype}: its variables are {sorted(dtypes)}")
    clone._parity_architecture = architecture
    return clone


def keras_clone(model: keras.Model, dtype: str, weights: list[np.ndarray] | None = None) -> keras.Model:
    """A new Keras model of ``model``'s architecture computing in ``dtype``, weights cast (exact when widening), or
    ``weights`` where given.

    Layers are rebuilt from their configs with ``dtype`` while floatx and the global policy say ``dtype`` too,
    so sublayers made without a dtype argument (the book's ResidualUnit makes its own) follow, and the Input
    is rebuilt in ``dtype`` (Keras casts what it is fed to the Input's dtype). The clone is the caller's; one it
    gives back with ``release_clone`` may be handed out again.
    """
    architecture = _architecture(model, dtype)
    spare = _SPARE_CLONES.pop(architecture, None)
    clone = spare if spare is not None else _rebuilt(model, dtype, architecture)
    clone.set_weights(weights if weights is not None else [np.asarray(w).astype(dtype) for w in model.get_weights()])
    return clone


def release_clone(clone: keras.Model) -> None:
    """Give back a clone from ``keras_clone`` that nothing uses any more (a few are kept for the next request)."""
    key = getattr(clone, "_parity_architecture", None)
    if key is None:
        return
    _SPARE_CLONES.pop(key, None)
    while len(_SPARE_CLONES) >= SPARE_CLONES_KEPT:
        _SPARE_CLONES.pop(next(iter(_SPARE_CLONES)))
    _SPARE_CLONES[key] = clone


def keras_floor_twin(model: keras.Model, seed: int = 0) -> keras.Model:
    """The Keras model's floor twin: float64 with the same weights (float32 model), or one ulp apart (float64)."""
    dtype = keras.backend.standardize_dtype(model.weights[0].dtype)
    if dtype == "float64":
        rng = np.random.default_rng(seed)
        return keras_clone(model, "float64", [one_ulp_apart(np.asarray(w), rng) for w in model.get_weights()])
    return keras_clone(model, "float64")


def torch_floor_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """The torch model's floor twin: a float64 copy (float32 model), or a copy one ulp apart (float64)."""
    dtype = next(t.dtype for t in model.state_dict().values() if t.is_floating_point())
    twin = copy.deepcopy(model)
    if dtype != torch.float64:
        return twin.double()  # in place: the copy's optimizer, if any, keeps pointing at its parameters
    moved_one_ulp(twin, seed)
    return twin


def moved_one_ulp(model: nn.Module, seed: int) -> None:
    """Every floating parameter and buffer of a float64 torch model moved one ulp at random, in place (the tensor
    objects stay, so an optimizer's references hold)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.from_numpy(one_ulp_apart(tensor.detach().cpu().numpy(), rng)))


# --- naming a cause only where its signature is present -------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """One tensor of a hypothesis test: what was seen, what is right, what the hypothesis predicts."""

    got: np.ndarray
    expected: np.ndarray
    candidate: np.ndarray
    noise_floor: float  # of got against expected, on expected's scale
    multiple: float  # FLOOR_MULTIPLE of the compared dtype


def explains(*evidence: Evidence) -> bool:
    """Whether a hypothesis explains what was seen: its signature is measurable (the candidate differs from the
    right value beyond ``multiple`` x the floor in at least one tensor) and in every tensor what is left
    (got - candidate) is within that or under EXPLAINED of the discrepancy. NaN must fall where the candidate
    has NaN."""
    present = False
    for e in evidence:
        got, candidate = np.asarray(e.got, np.float64), np.asarray(e.candidate, np.float64)
        if got.shape != candidate.shape or not np.array_equal(np.isnan(got), np.isnan(candidate)):
            return False
        scale = scale_of(e.expected)
        finite = np.isfinite(got) & np.isfinite(candidate)
        left = scaled_distance(got[finite], candidate[finite], scale)
        discrepancy = scaled_distance(np.nan_to_num(got), np.nan_to_num(np.asarray(e.expected, np.float64)), scale)
        if left > max(e.multiple * e.noise_floor, EXPLAINED * discrepancy):
            return False
        signature = scaled_distance(candidate, e.expected, scale)
        present = present or ratio(signature, e.noise_floor) > e.multiple
    return present
